"""Readers of file formats: ``.h5ad``, 10x Genomics ``.h5`` and ``.mtx``, TileDB-SOMA queries.

Each turns its input into a :class:`Source`; ``as_source`` (in ``_open``) picks the reader.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.io import mmread

from ._categories import obs_categories
from ._source import ArraySource, ChunkSource, H5CSRSource, Source

try:
    from anndata.io import read_elem
except ImportError:  # anndata < 0.11
    from anndata.experimental import read_elem


def _decode(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "S" or a.dtype == object:
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a])
    return a.astype(str)


def read_h5ad_source(path, layer=None, batch_key=None, labels_key=None) -> Source:
    """An ``.h5ad`` file (``X`` or a layer) as a source, without loading the matrix.

    A CSR matrix is read by rows in place (:class:`H5CSRSource`); a dense one is streamed in
    chunks. CSC cannot be read by cell: the error says how to convert it. ``obs`` is read whole
    for the covariates (``batch_key``, ``labels_key``; see :func:`categorize`).
    """
    with h5py.File(path, "r") as f:
        obs = read_elem(f["obs"])
        var = read_elem(f["var"])
        node = f["X"] if layer is None else f["layers"][layer]
        enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
        if isinstance(enc, bytes):
            enc = enc.decode()
        group = node.name
        is_group = isinstance(node, h5py.Group)
        shape = tuple(node.attrs["shape"]) if is_group and "shape" in node.attrs else node.shape
    bc, bcat = obs_categories(obs, batch_key)
    lc, lcat = obs_categories(obs, labels_key)
    meta = dict(var_names=var.index, obs_names=obs.index.to_numpy(), batch_codes=bc,
                labels_codes=lc)
    what = f"{path}:{group}"
    if is_group and enc in ("csr_matrix", "csr"):
        src = H5CSRSource(path, group, shape[1], **meta)
    elif is_group and enc in ("csc_matrix", "csc"):
        raise ValueError(
            f"{what} is stored as CSC (gene-major), which cannot be read by cell without loading "
            "it whole. Load it in memory (anndata.read_h5ad) and pass the AnnData, or rewrite it "
            "as CSR: adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)."
        )
    elif not is_group:
        src = ChunkSource(_dense_h5_chunks(path, group), shape[0], shape[1], **meta)
    else:
        raise ValueError(f"{what}: unsupported matrix encoding {enc!r}")
    src.batch_categories, src.labels_categories = bcat, lcat
    return src


def _dense_h5_chunks(path, group):
    def chunks(chunk_size):
        with h5py.File(path, "r") as f:
            d = f[group]
            for start in range(0, d.shape[0], chunk_size):
                yield start, sp.csr_matrix(d[start : start + chunk_size])

    return chunks


def read_10x_h5_source(path) -> H5CSRSource:
    """A 10x Cell Ranger ``filtered_feature_bc_matrix.h5`` (v3) or v2 ``.h5`` as a source.

    The file stores cells as CSC columns of a genes x cells matrix, which is CSR by cell, so
    cells are read in place without conversion. Gene symbols become ``var_names``; all feature
    types are kept.
    """
    with h5py.File(path, "r") as f:
        if "matrix" in f:
            g = f["matrix"]
            group = "matrix"
            names = _decode(g["features"]["name"][...])
        else:
            groups = [k for k in f if isinstance(f[k], h5py.Group) and "indptr" in f[k]]
            if not groups:
                raise ValueError(f"{path} is not a 10x h5 matrix (no 'matrix' group)")
            group = groups[0]
            g = f[group]
            names = _decode(g["gene_names"][...] if "gene_names" in g else g["genes"][...])
        shape = tuple(int(x) for x in g["shape"][...])
        barcodes = _decode(g["barcodes"][...])
    n_genes, n_cells = shape
    if barcodes.size != n_cells or names.size != n_genes:
        raise ValueError(f"{path}: shape {shape} disagrees with barcodes/features")
    return H5CSRSource(path, group, n_genes, var_names=names, obs_names=barcodes)


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _first(d: Path, names):
    for n in names:
        if (d / n).exists():
            return d / n
    return None


def read_mtx_source(path) -> ArraySource:
    """A Matrix Market file or a 10x mtx directory as an in-memory source.

    For a directory (``matrix.mtx(.gz)`` with ``features.tsv(.gz)``/``genes.tsv`` and
    ``barcodes.tsv(.gz)``) the matrix is genes x cells and is transposed. A lone ``.mtx`` is
    taken as genes x cells when a features/genes file beside it has one line per matrix row,
    otherwise as cells x genes.
    """
    path = Path(path)
    d = path if path.is_dir() else path.parent
    mpath = _first(d, ["matrix.mtx.gz", "matrix.mtx"]) if path.is_dir() else path
    if mpath is None:
        raise FileNotFoundError(f"no matrix.mtx(.gz) in {path}")
    m = mmread(str(mpath))
    m = sp.csr_matrix(m) if not sp.issparse(m) else m
    fpath = _first(d, ["features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"])
    bpath = _first(d, ["barcodes.tsv.gz", "barcodes.tsv"])
    genes = barcodes = None
    if fpath is not None:
        with _open_text(fpath) as fh:
            rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
        genes = np.array([r[1] if len(r) > 1 else r[0] for r in rows])
    if bpath is not None:
        with _open_text(bpath) as fh:
            barcodes = np.array([line.strip() for line in fh if line.strip()])
    genes_by_cells = genes is not None and genes.size == m.shape[0]
    if genes_by_cells:
        m = m.T
    m = sp.csr_matrix(m)
    m.sort_indices()
    if genes is not None and genes.size != m.shape[1]:
        genes = None
    if barcodes is not None and barcodes.size != m.shape[0]:
        barcodes = None
    data = m.data
    if data.dtype != np.float32 and np.all(data == np.round(data)) and (
            data.size == 0 or data.max() < 2**24):
        data = data.astype(np.float32)
    return ArraySource(m.indptr.astype(np.int64), m.indices.astype(np.int32), data, m.shape[1],
                       var_names=genes, obs_names=barcodes)


def soma_source(query, X_name: str | None = None, batch_key: str | None = None,
                labels_key: str | None = None, var_name_column: str | None = None,
                obs_chunk: int | None = None) -> ChunkSource:
    """A TileDB-SOMA ``ExperimentAxisQuery`` (e.g. a CELLxGENE Census query) as a source.

    Cells are streamed in query order, ``chunk_size`` at a time, each chunk read with one
    coordinate query, so memory stays bounded. Requires the optional ``tiledbsoma`` package.

    Parameters
    ----------
    query
        ``experiment.axis_query("RNA", obs_query=..., var_query=...)``.
    X_name
        The X layer holding raw counts (default: ``"raw"`` as in the Census, else ``"data"``
        as written by ``tiledbsoma.io.from_anndata``, else the only layer).
    batch_key, labels_key
        obs columns read as covariate codes.
    var_name_column
        var column holding gene names (default: ``feature_name`` if present, else the first
        string column).
    """
    obs_cols = [c for c in (batch_key, labels_key) if c is not None]
    obs_joinids = query.obs_joinids().to_numpy()
    var_joinids = query.var_joinids().to_numpy()
    var = query.var().concat().to_pandas()
    if var_name_column is None:
        for c in ("feature_name", "var_id", "gene_ids", "feature_id"):
            if c in var:
                var_name_column = c
                break
        else:
            var_name_column = next(c for c in var.columns if var[c].dtype == object)
    var = var.set_index("soma_joinid").loc[var_joinids]
    var_names = var[var_name_column].astype(str).to_numpy()
    obs_schema = query.experiment.obs.schema.names
    name_col = "obs_id" if "obs_id" in obs_schema else None
    cols = ["soma_joinid"] + obs_cols + ([name_col] if name_col else [])
    obs = query.obs(column_names=cols).concat().to_pandas().set_index("soma_joinid")
    obs = obs.loc[obs_joinids]
    obs_names = (obs[name_col].astype(str).to_numpy() if name_col
                 else obs_joinids.astype(str))
    bc, bcat = obs_categories(obs, batch_key)
    lc, lcat = obs_categories(obs, labels_key)
    layers = query.experiment.ms[query.measurement_name].X
    if X_name is None:
        keys = list(layers.keys())
        X_name = next((k for k in ("raw", "data") if k in keys), keys[0] if len(keys) == 1
                      else None)
        if X_name is None:
            raise ValueError(f"choose the counts layer with X_name=; X layers: {keys}")
    X = layers[X_name]
    var_pos = pd.Index(var_joinids)
    n_genes = var_joinids.size

    def chunks(chunk_size):
        step = obs_chunk or chunk_size
        for a in range(0, obs_joinids.size, step):
            ids = obs_joinids[a : a + step]
            tbl = X.read(coords=(ids, var_joinids)).tables().concat()
            r = pd.Index(ids).get_indexer(tbl["soma_dim_0"].to_numpy())
            c = var_pos.get_indexer(tbl["soma_dim_1"].to_numpy())
            v = tbl["soma_data"].to_numpy()
            m = sp.csr_matrix((v, (r, c)), shape=(ids.size, n_genes))
            m.sum_duplicates()
            m.sort_indices()
            yield a, sp.csr_matrix(m, dtype=np.float32)

    src = ChunkSource(chunks, obs_joinids.size, n_genes, var_names=var_names,
                      obs_names=obs_names,
                      batch_codes=bc, labels_codes=lc)
    src.batch_categories, src.labels_categories = bcat, lcat
    return src
