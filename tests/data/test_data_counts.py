"""Clear errors for data that are not raw counts."""

import anndata as ad
import numpy as np
import pytest

from scvi_fast.data import CSRStore, check_counts, write_h5ad
from _data_helpers import random_counts


@pytest.mark.parametrize("bad, match", [
    (-2.0, "negative values"),
    (1.5, "non-integer values"),
    (np.nan, "NaN or infinite"),
    (np.inf, "NaN or infinite"),
])
def test_bad_values(rng, bad, match):
    X = random_counts(rng, 500, 40, density=0.3)
    X.data[rng.integers(X.nnz)] = bad
    with pytest.raises(ValueError, match=match):
        check_counts(X, chunk_size=64)
    with pytest.raises(ValueError, match=match):
        check_counts(X.toarray(), chunk_size=64)


def test_zero_count_cells_named(rng):
    X = random_counts(rng, 300, 30, density=0.3).tolil()
    for r in (3, 100, 299):
        X.rows[r], X.data[r] = [], []
    X = X.tocsr()
    obs_names = [f"cell{i}" for i in range(300)]
    adata = ad.AnnData(X=X)
    adata.obs_names = obs_names
    with pytest.raises(ValueError) as err:
        check_counts(adata, chunk_size=50)
    msg = str(err.value)
    assert "3 cells have zero total counts" in msg
    assert "3 (cell3)" in msg and "100 (cell100)" in msg
    assert "sc.pp.filter_cells(adata, min_counts=1)" in msg
    check_counts(adata, allow_zero_cells=True)
    with pytest.raises(ValueError, match="zero total counts"):
        check_counts(X)


def test_writer_refuses_zero_count_cells(rng, tmp_path):
    X = random_counts(rng, 100, 30, density=0.3, empty_rows=2)
    with pytest.raises(ValueError, match="2 cells have zero total counts"):
        CSRStore.create(tmp_path / "s", X)
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_as_it_writes(rng, tmp_path):
    X = random_counts(rng, 200, 30, density=0.3)
    X.data[5] = 0.25
    with pytest.raises(ValueError, match="non-integer"):
        CSRStore.create(tmp_path / "s", X, chunk_size=40)
    assert not (tmp_path / "s").exists()


def test_good_counts_pass(small_adata, tmp_path):
    check_counts(small_adata[np.asarray(small_adata.X.sum(axis=1)).ravel() > 0])
    check_counts(random_counts(np.random.default_rng(0), 0, 10))


def test_layer_and_h5ad(rng, tmp_path):
    X = random_counts(rng, 100, 20, density=0.4)
    adata = ad.AnnData(X=np.log1p(X), layers={"counts": X})
    check_counts(adata, layer="counts")
    with pytest.raises(ValueError, match="X contains .* non-integer"):
        check_counts(adata)
    write_h5ad(adata, tmp_path / "a.h5ad")
    check_counts(tmp_path / "a.h5ad", layer="counts")
    Y = X.copy()
    Y.data[0] = -1
    write_h5ad(ad.AnnData(X=X, layers={"counts": Y}), tmp_path / "b.h5ad")
    with pytest.raises(ValueError, match="layer 'counts' contains 1 negative"):
        check_counts(tmp_path / "b.h5ad", layer="counts")


@pytest.mark.parametrize("value", [1e39, 2.0**24 + 2])
def test_counts_beyond_float32_are_refused_with_cell_and_gene(value):
    """A finite float64 count that float32 cannot hold (1e39 becomes inf) or hold exactly is
    refused before anything runs, naming the cell and the gene."""
    x = np.ones((4, 6))
    x[2, 3] = value
    a = ad.AnnData(x)
    a.obs_names = [f"c{i}" for i in range(4)]
    a.var_names = [f"g{i}" for i in range(6)]
    with pytest.raises(ValueError, match=r"cell 2 \(c2\), gene 3 \(g3\).*not exact in float32"):
        check_counts(a)
    import scipy.sparse as sp

    with pytest.raises(ValueError, match=r"cell 2, gene 3"):
        check_counts(sp.csr_matrix(x))
