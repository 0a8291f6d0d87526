"""Seurat v3 highly variable genes, out of core, against scanpy."""

import numpy as np
import pandas as pd
import pytest

from scvi_fast.data import CSRStore, highly_variable_genes


def _scanpy_hvg(adata, n_top, batch_key):
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("skmisc")
    return sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top,
                                       batch_key=batch_key, inplace=False)


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_matches_scanpy_on_synthetic_store(small_adata, tmp_path, batch_key):
    ref = _scanpy_hvg(small_adata, 60, batch_key)
    store = CSRStore.create(tmp_path / "s", small_adata, batch_key="batch", check=False)
    ours = highly_variable_genes(store, 60, batch_key=batch_key, chunk_size=200,
                                 loess="skmisc")
    ref = ref.set_index(small_adata.var_names) if "gene" not in ref else ref
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(),
                                  ref["highly_variable"].to_numpy())
    np.testing.assert_allclose(ours["variances_norm"], ref["variances_norm"], rtol=1e-6)
    np.testing.assert_allclose(ours["means"], ref["means"], rtol=1e-6)
    np.testing.assert_allclose(ours["variances"], ref["variances"], rtol=1e-6)
    if batch_key is not None:
        np.testing.assert_array_equal(ours["highly_variable_nbatches"],
                                      ref["highly_variable_nbatches"])
        np.testing.assert_allclose(ours["highly_variable_rank"], ref["highly_variable_rank"])


def test_matches_scanpy_on_real_data(shared_data):
    import anndata as ad

    adata = ad.read_h5ad(shared_data / "kang_ctrl_muscat.h5ad")
    ref = _scanpy_hvg(adata, 500, "donor")
    ours = highly_variable_genes(adata, 500, batch_key="donor", loess="skmisc")
    assert ours["highly_variable"].sum() == 500
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(),
                                  ref["highly_variable"].to_numpy())


def test_direct_loess_is_close_to_scanpy(small_adata):
    ref = _scanpy_hvg(small_adata, 60, "batch")
    ours = highly_variable_genes(small_adata, 60, batch_key="batch", loess="direct")
    overlap = (ours["highly_variable"].to_numpy() & ref["highly_variable"].to_numpy()).sum()
    assert overlap >= 55
    np.testing.assert_allclose(ours["variances_norm"], ref["variances_norm"], rtol=0.05)


def test_store_and_anndata_agree(small_adata, tmp_path):
    store = CSRStore.create(tmp_path / "s", small_adata, batch_key="batch",
                            labels_key="cell_type", check=False)
    a = highly_variable_genes(store, 40, batch_key="cell_type", loess="direct")
    b = highly_variable_genes(small_adata, 40, batch_key="cell_type", loess="direct")
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(KeyError, match="records"):
        highly_variable_genes(store, 40, batch_key="donor")


def _loess_reference(x, y, span):
    """Direct degree-2 loess at every point with numpy (tricube weights, q nearest)."""
    n = x.size
    q = int(np.floor(span * n))
    out = np.empty(n)
    for i in range(n):
        d = x - x[i]
        near = np.argsort(np.abs(d), kind="stable")[:q]
        dmax = np.abs(d[near]).max()
        w = np.clip(1 - (np.abs(d[near]) / dmax) ** 3, 0, None) ** 3
        A = np.stack([np.ones(q), d[near], d[near] ** 2], axis=1)
        coef = np.linalg.lstsq(A * np.sqrt(w)[:, None], y[near] * np.sqrt(w), rcond=None)[0]
        out[i] = coef[0]
    return out


def test_direct_loess_matches_numpy_reference(rng):
    from scvi_fast.data._hvg import _loess_fit

    x = rng.normal(size=400)
    y = np.sin(x) + 0.3 * x**2 + rng.normal(scale=0.2, size=400)
    np.testing.assert_allclose(_loess_fit(x, y, 0.3, "direct"), _loess_reference(x, y, 0.3),
                               rtol=1e-7, atol=1e-9)
