"""Readers: 10x h5 and mtx written here, TileDB-SOMA (optional), and the shared real files."""

import gzip

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from scvi_fast.data import CSRLoader, CSRStore, as_source, check_counts, write_h5ad
from _data_helpers import random_counts


def _write_10x_h5(path, X, genes, barcodes):
    """Cell Ranger v3 layout: a genes x cells CSC matrix, i.e. CSR by cell."""
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = X.data.astype(np.int32)
        g["indices"] = X.indices.astype(np.int64)
        g["indptr"] = X.indptr.astype(np.int64)
        g["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        feat = g.create_group("features")
        feat["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        feat["name"] = np.array(genes, dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")


def _names(rng, X):
    genes = [f"G{i}" for i in range(X.shape[1])]
    barcodes = [f"AAAC{i:06d}-1" for i in range(X.shape[0])]
    return genes, barcodes


def test_10x_h5(rng, tmp_path):
    X = random_counts(rng, 250, 80, density=0.2)
    genes, barcodes = _names(rng, X)
    _write_10x_h5(tmp_path / "f.h5", X, genes, barcodes)
    src = as_source(tmp_path / "f.h5")
    assert src.shape == X.shape and list(src.var_names) == genes
    assert list(src.obs_names[:2]) == barcodes[:2]
    store = CSRStore.create(tmp_path / "s", tmp_path / "f.h5", chunk_size=64)
    back = store.to_anndata()
    assert (back.X != X).nnz == 0 and list(back.obs_names) == barcodes
    ids = []
    for mb in CSRLoader(tmp_path / "f.h5", batch_size=50, block_size=4, buffer_size=100):
        assert (mb.to_scipy() != X[mb.obs_idx]).nnz == 0
        ids.append(mb.obs_idx)
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(250))
    sc = pytest.importorskip("scanpy")
    ref = sc.read_10x_h5(tmp_path / "f.h5")
    assert (sp.csr_matrix(ref.X) != back.X).nnz == 0


@pytest.mark.parametrize("gz", [True, False])
def test_10x_mtx_directory(rng, tmp_path, gz):
    X = random_counts(rng, 120, 70, density=0.2)
    genes, barcodes = _names(rng, X)
    d = tmp_path / "mtx"
    d.mkdir()
    scipy.io.mmwrite(d / "matrix.mtx", X.T.astype(np.int64))
    opener = (lambda p: gzip.open(str(p) + ".gz", "wt")) if gz else (lambda p: open(p, "w"))
    with opener(d / "features.tsv") as fh:
        fh.writelines(f"ENSG{i}\t{g}\tGene Expression\n" for i, g in enumerate(genes))
    with opener(d / "barcodes.tsv") as fh:
        fh.writelines(b + "\n" for b in barcodes)
    if gz:
        raw = (d / "matrix.mtx").read_bytes()
        (d / "matrix.mtx").unlink()
        with gzip.open(d / "matrix.mtx.gz", "wb") as fh:
            fh.write(raw)
    src = as_source(d)
    assert src.shape == X.shape and list(src.var_names) == genes
    assert (src.get_rows(np.arange(120)) != X).nnz == 0
    store = CSRStore.create(tmp_path / "s", d)
    assert list(store.to_anndata().obs_names) == barcodes
    # a lone cells x genes .mtx(.gz) without a features file
    lone = tmp_path / "lone.mtx"
    scipy.io.mmwrite(lone, X)
    assert (as_source(lone).get_rows(np.arange(120)) != X).nnz == 0


def test_soma_query(small_adata, tmp_path):
    tiledbsoma = pytest.importorskip("tiledbsoma")
    import tiledbsoma.io

    uri = tiledbsoma.io.from_anndata(str(tmp_path / "soma"), small_adata,
                                     measurement_name="RNA")
    keep_genes = list(small_adata.var_names[10:150])
    with tiledbsoma.Experiment.open(uri) as exp:
        q = exp.axis_query(
            "RNA",
            obs_query=tiledbsoma.AxisQuery(value_filter="batch != 'batch_1'"),
            var_query=tiledbsoma.AxisQuery(
                value_filter=f"var_id in {keep_genes}"),
        )
        src = as_source(q, batch_key="cell_type")
        store = CSRStore.create(tmp_path / "s", q, batch_key="cell_type", chunk_size=100,
                                check=False)
    mask = (small_adata.obs["batch"] != "batch_1").to_numpy()
    ref = small_adata[mask, keep_genes]
    assert src.shape == ref.shape
    back = store.to_anndata()
    np.testing.assert_array_equal(back.var_names, keep_genes)
    np.testing.assert_array_equal(back.obs_names, ref.obs_names)
    assert (back.X != sp.csr_matrix(ref.X)).nnz == 0
    np.testing.assert_array_equal(back.obs["cell_type"].astype(str),
                                  ref.obs["cell_type"].astype(str))


REAL = ["pbmc3k_raw.h5ad", "kang_ctrl_muscat.h5ad", "kang_ctrlstim_muscat_example.h5ad",
        "scvi_tests_pbmc_cite_2batch.h5ad", "scanpy_10x_mouse_10k_subset.h5ad",
        "scdcc_10x_pbmc_4k.h5ad"]


@pytest.mark.parametrize("name", REAL)
def test_real_h5ad_backed_loader_and_store(shared_data, tmp_path, name):
    path = shared_data / name
    adata = ad.read_h5ad(path)
    keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    if not keep.all():
        with pytest.raises(ValueError, match="zero total counts"):
            check_counts(path)
        adata = adata[keep].copy()
        write_h5ad(adata, tmp_path / "filtered.h5ad")
        path = tmp_path / "filtered.h5ad"
    key = next(iter(adata.obs.columns), None)
    store = CSRStore.create(tmp_path / "s", path, batch_key=key)
    back = store.to_anndata()
    assert (back.X != adata.X).nnz == 0
    np.testing.assert_array_equal(back.obs_names, adata.obs_names)
    np.testing.assert_array_equal(back.var_names, adata.var_names)
    if key is not None:
        np.testing.assert_array_equal(back.obs[key].astype(str), adata.obs[key].astype(str))
    assert store.data.dtype == np.uint16 and store.indices.dtype == np.uint16
    # backed h5ad straight into the loader: a few shuffled batches, exactly
    loader = CSRLoader(path, batch_size=256, block_size=16, buffer_size=1024, seed=1)
    for i, mb in enumerate(loader):
        assert (mb.to_scipy() != adata.X[mb.obs_idx]).nnz == 0
        if i == 3:
            break


def test_10x_h5_v2_layout(rng, tmp_path):
    X = random_counts(rng, 90, 30, density=0.3)
    genes, barcodes = _names(rng, X)
    with h5py.File(tmp_path / "v2.h5", "w") as f:
        g = f.create_group("GRCh38")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = X.data.astype(np.int32)
        g["indices"] = X.indices.astype(np.int64)
        g["indptr"] = X.indptr.astype(np.int64)
        g["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        g["genes"] = np.array([f"ENSG{i}" for i in range(30)], dtype="S")
        g["gene_names"] = np.array(genes, dtype="S")
    src = as_source(tmp_path / "v2.h5")
    assert list(src.var_names) == genes
    assert (src.get_rows(np.arange(90)) != X).nnz == 0


def test_backed_h5ad_with_gene_subset(small_adata, tmp_path):
    write_h5ad(small_adata, tmp_path / "a.h5ad")
    genes = list(small_adata.var_names[::3])
    ref = small_adata[:, genes]
    keep = np.asarray(ref.X.sum(axis=1)).ravel() > 0
    store = CSRStore.create(tmp_path / "s", tmp_path / "a.h5ad", genes=genes, check=False,
                            batch_key="batch")
    assert (store.to_scipy() != sp.csr_matrix(ref.X)).nnz == 0
    assert keep.all() or store.n_cells == ref.n_obs
