"""The synthetic count generator."""

import numpy as np
import pytest

from scvi_fast.data import synthetic_anndata


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
def test_density_and_layout(density):
    a = synthetic_anndata(n_cells=800, n_genes=400, n_batches=3, n_cell_types=4,
                          density=density, seed=1)
    frac = a.X.nnz / np.prod(a.shape)
    assert abs(frac - density) < 0.25 * density
    assert a.X.format == "csr" and a.X.dtype == np.float32
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() >= 1
    assert a.obs["batch"].dtype == "category" and a.obs["cell_type"].dtype == "category"
    assert list(a.obs["batch"].cat.categories) == ["batch_0", "batch_1", "batch_2"]
    assert a.var_names[0] == "gene_000" and a.var_names.is_unique
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    assert np.std(np.log(lib[lib > 0])) > 0.2  # log-normal spread of library sizes


def test_deterministic_and_chunk_independent():
    a = synthetic_anndata(n_cells=500, n_genes=200, seed=4, chunk_size=64)
    b = synthetic_anndata(n_cells=500, n_genes=200, seed=4, chunk_size=1000)
    assert (a.X != b.X).nnz == 0
    c = synthetic_anndata(n_cells=500, n_genes=200, seed=5)
    assert (a.X != c.X).nnz > 0


def test_cell_types_and_batches_differ():
    a = synthetic_anndata(n_cells=3000, n_genes=300, n_batches=2, n_cell_types=3,
                          density=0.2, seed=2)
    X = a.X.toarray()
    X = X / X.sum(axis=1, keepdims=True)
    t = a.obs["cell_type"].cat.codes.to_numpy()
    b = a.obs["batch"].cat.codes.to_numpy()
    prof = np.stack([X[t == k].mean(axis=0) for k in range(3)])
    lfc = np.abs(np.log((prof[0] + 1e-4) / (prof[1] + 1e-4)))
    assert np.sum(lfc > 1.5) >= 5  # marker programs
    bprof = np.stack([X[(b == k) & (t == 0)].mean(axis=0) for k in range(2)])
    blfc = np.abs(np.log((bprof[0] + 1e-4) / (bprof[1] + 1e-4)))
    assert np.median(blfc) > 0.1  # multiplicative batch effects
