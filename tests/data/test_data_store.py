"""The on-disk CSR store: round trips, dtypes, subsetting, shuffling, atomicity, corruption."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from scvi_fast.data import (CSRLoader, CSRStore, StoreCorruptError, as_source,
                            synthetic_anndata, write_h5ad, write_synthetic_store)
from _data_helpers import random_counts


def _assert_same_anndata(a, b, keys=("batch", "cell_type")):
    assert a.shape == b.shape
    assert (sp.csr_matrix(a.X) != sp.csr_matrix(b.X)).nnz == 0
    np.testing.assert_array_equal(a.obs_names, b.obs_names)
    np.testing.assert_array_equal(a.var_names, b.var_names)
    for k in keys:
        np.testing.assert_array_equal(a.obs[k].astype(str), b.obs[k].astype(str))


def test_round_trip_anndata(small_adata, tmp_path):
    store = CSRStore.create(tmp_path / "s", small_adata, batch_key="batch",
                            labels_key="cell_type", chunk_size=400)
    assert (store.n_cells, store.n_genes) == small_adata.shape
    assert store.batch_categories == list(small_adata.obs["batch"].cat.categories)
    assert store.labels_categories == list(small_adata.obs["cell_type"].cat.categories)
    _assert_same_anndata(store.to_anndata(), small_adata)
    again = CSRStore.open(tmp_path / "s", verify=True)
    store.verify()
    np.testing.assert_array_equal(again.batch_codes,
                                  small_adata.obs["batch"].cat.codes.to_numpy())
    assert again.var_names.dtype.kind == "U"


def test_smallest_exact_dtypes(rng, tmp_path):
    X = random_counts(rng, 50, 300, max_count=200)
    assert CSRStore.create(tmp_path / "a", X).data.dtype == np.uint8
    s = CSRStore.create(tmp_path / "b", X, chunk_size=7)
    assert s.indices.dtype == np.uint16 and s.data.dtype == np.uint8
    X2 = X.copy()
    X2.data[-1] = 70000  # late chunk forces an upcast of what was written so far
    s2 = CSRStore.create(tmp_path / "c", X2, chunk_size=7)
    assert s2.data.dtype == np.uint32
    assert (s2.to_scipy() != X2).nnz == 0
    s3 = CSRStore.create(tmp_path / "d", X[:, :200])
    assert s3.indices.dtype == np.uint8
    X4 = X.copy()
    X4.data = X4.data * 0.5
    s4 = CSRStore.create(tmp_path / "e", X4, check=False)
    assert s4.data.dtype == np.float32 and (s4.to_scipy() != X4).nnz == 0


def test_gene_subset_and_order(small_adata, tmp_path):
    genes = list(small_adata.var_names[[5, 2, 200, 17]])
    keep = small_adata[:, genes].copy()
    keep = keep[np.asarray(keep.X.sum(axis=1)).ravel() > 0].copy()
    store = CSRStore.create(tmp_path / "s", keep, genes=genes, batch_key="batch",
                            labels_key="cell_type")
    np.testing.assert_array_equal(store.var_names, genes)
    _assert_same_anndata(store.to_anndata(), keep)
    gene_file = tmp_path / "genes.txt"
    gene_file.write_text("\n".join(genes[:2]) + "\n")
    sub = CSRStore.create(tmp_path / "t", small_adata, genes=gene_file, check=False)
    assert list(sub.var_names) == genes[:2]
    with pytest.raises(KeyError, match="not in the data"):
        CSRStore.create(tmp_path / "u", small_adata, genes=["nope"])


@pytest.mark.parametrize("from_h5ad", [False, True])
def test_pre_shuffle(small_adata, tmp_path, from_h5ad):
    src = small_adata
    if from_h5ad:
        write_h5ad(small_adata, tmp_path / "a.h5ad")
        src = tmp_path / "a.h5ad"
    store = CSRStore.create(tmp_path / "s", src, batch_key="batch", shuffle=True, seed=4,
                            chunk_size=500)
    perm = store.source_rows
    assert not np.array_equal(perm, np.arange(small_adata.n_obs))
    np.testing.assert_array_equal(np.sort(perm), np.arange(small_adata.n_obs))
    ref = small_adata[perm]
    _assert_same_anndata(store.to_anndata(), ref, keys=("batch",))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_store_as_loader_source(small_adata, tmp_path):
    CSRStore.create(tmp_path / "s", small_adata, batch_key="batch")
    codes = small_adata.obs["batch"].cat.codes.to_numpy()
    for src in (tmp_path / "s", str(tmp_path / "s"), CSRStore.open(tmp_path / "s")):
        loader = CSRLoader(src, batch_size=100, buffer_size=300, block_size=10)
        ids = []
        for mb in loader:
            ref = small_adata.X[mb.obs_idx]
            assert (mb.to_scipy() != ref).nnz == 0
            np.testing.assert_array_equal(mb.batch, codes[mb.obs_idx])
            ids.append(mb.obs_idx)
        np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(small_adata.n_obs))
    # codes passed in override the stored ones
    other = np.arange(small_adata.n_obs) % 7
    mb = next(iter(CSRLoader(tmp_path / "s", batch_codes=other, shuffle=False)))
    np.testing.assert_array_equal(mb.batch, other[: mb.n_cells])


@pytest.mark.parametrize("n_batches", [2, 24])
def test_synthetic_store_equals_synthetic_anndata(tmp_path, n_batches):
    from scvi_fast.data._synthetic import GENERATOR_VERSION

    kw = dict(n_genes=120, n_batches=n_batches, n_cell_types=3, density=0.2, seed=9)
    adata = synthetic_anndata(n_cells=700, **kw, chunk_size=256)
    store = write_synthetic_store(tmp_path / "s", 700, **kw, chunk_size=100)
    assert (store.to_scipy() != adata.X).nnz == 0
    assert store.manifest["synthetic"] == {"seed": 9, "density": 0.2, "n_batches": n_batches,
                                           "n_cell_types": 3, "version": GENERATOR_VERSION}
    back = store.to_anndata()
    np.testing.assert_array_equal(back.obs["batch"].astype(str), adata.obs["batch"].astype(str))
    np.testing.assert_array_equal(back.obs["cell_type"].astype(str),
                                  adata.obs["cell_type"].astype(str))


def _make(tmp_path, rng):
    X = random_counts(rng, 200, 40)
    return CSRStore.create(tmp_path / "s", X), tmp_path / "s"


def test_truncated_file_is_reported(rng, tmp_path):
    _, path = _make(tmp_path, rng)
    raw = (path / "data.bin").read_bytes()
    (path / "data.bin").write_bytes(raw[:-3])
    with pytest.raises(StoreCorruptError, match="truncated"):
        CSRStore.open(path)
    with pytest.raises(StoreCorruptError, match="truncated"):
        CSRLoader(path)


def test_corrupt_bytes_fail_checksum(rng, tmp_path):
    _, path = _make(tmp_path, rng)
    raw = bytearray((path / "indices.bin").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (path / "indices.bin").write_bytes(bytes(raw))
    CSRStore.open(path)  # a quick open checks sizes and row pointers only
    with pytest.raises(StoreCorruptError, match="checksum"):
        CSRStore.open(path, verify=True)


def test_corrupt_indptr_is_reported(rng, tmp_path):
    _, path = _make(tmp_path, rng)
    ip = np.fromfile(path / "indptr.bin", dtype=np.int64)
    ip[50] = ip[-1] + 5
    ip.tofile(path / "indptr.bin")
    with pytest.raises(StoreCorruptError, match="indptr"):
        CSRStore.open(path)


def test_bad_manifest_and_missing_files(rng, tmp_path):
    _, path = _make(tmp_path, rng)
    (path / "labels.bin").unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        CSRStore.open(path)
    (path / "manifest.json").write_text('{"format": "scvi_fast.csr_st')
    with pytest.raises(StoreCorruptError, match="corrupt"):
        CSRStore.open(path)
    m = tmp_path / "m"
    m.mkdir()
    with pytest.raises(StoreCorruptError, match="did not\\s+finish|not a CSR store"):
        CSRStore.open(m)


def test_future_format_version(rng, tmp_path):
    _, path = _make(tmp_path, rng)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match="version 99"):
        CSRStore.open(path)


def test_failed_conversion_leaves_nothing(rng, tmp_path):
    X = random_counts(rng, 300, 20)
    X.data[-1] = -1.0  # discovered in the last chunk
    with pytest.raises(ValueError, match="negative"):
        CSRStore.create(tmp_path / "s", X, chunk_size=50)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_only_when_asked(rng, tmp_path):
    store, path = _make(tmp_path, rng)
    with pytest.raises(FileExistsError):
        CSRStore.create(path, store)
    Y = random_counts(rng, 30, 40)
    new = CSRStore.create(path, Y, overwrite=True)
    assert new.n_cells == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_store_from_store_keeps_covariates(small_adata, tmp_path):
    a = CSRStore.create(tmp_path / "a", small_adata, batch_key="batch", labels_key="cell_type")
    b = CSRStore.create(tmp_path / "b", a, genes=list(small_adata.var_names[:200]))
    assert b.batch_key == "batch" and b.labels_categories == a.labels_categories
    np.testing.assert_array_equal(b.labels_codes, a.labels_codes)
    assert as_source(tmp_path / "b").n_genes == 200
