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


def test_zero_probability_table_matches_numpy():
    from scvi_fast.data._synthetic import _N_LIB_BINS, _Params

    p = _Params(n_genes=37, n_batches=5, n_cell_types=3, density=0.2, seed=11)
    th = p.theta
    mu = (p.lib[None, :, :, None] * p.rho[:, None, None, :] * p.beta[None, :, None, :])
    ref = np.exp(th * (np.log(th) - np.log(th + mu))).reshape(-1, 37)
    assert p.p0.shape == (3 * 5 * _N_LIB_BINS, 37) and p.p0.dtype == np.float32
    # float64 math in numba vs numpy, then rounded to float32: equal up to one float32 ulp
    np.testing.assert_array_max_ulp(p.p0, ref.astype(np.float32), maxulp=1)


@pytest.mark.parametrize("n_batches", [3, 40])
def test_calibrated_density_with_many_batches(n_batches):
    # above 16 batches the library scale is calibrated on 16 of them
    a = synthetic_anndata(n_cells=4000, n_genes=300, n_batches=n_batches, n_cell_types=5,
                          density=0.1, seed=6)
    frac = a.X.nnz / np.prod(a.shape)
    assert abs(frac - 0.1) < 0.01
    assert a.obs["batch"].nunique() == n_batches


def test_counts_do_not_depend_on_the_thread_count():
    import numba

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = synthetic_anndata(n_cells=300, n_genes=150, n_batches=20, seed=9)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        b = synthetic_anndata(n_cells=300, n_genes=150, n_batches=20, seed=9)
    finally:
        numba.set_num_threads(before)
    assert (a.X != b.X).nnz == 0
    assert np.array_equal(a.obs["batch"].cat.codes, b.obs["batch"].cat.codes)
