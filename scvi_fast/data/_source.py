"""Row sources: what the loader and the store writer read cells from.

A source knows its shape, gene names, per-cell covariate codes and how to produce rows. Two
abilities exist:

* ``iter_chunks(chunk_size)``: stream the rows in order as CSR chunks (every source);
* ``read_rows(rows, out_indptr, out_indices, out_data)``: copy arbitrary rows into a
  preallocated CSR buffer (sources with random row access: in-memory CSR, the on-disk store,
  backed ``.h5ad`` and 10x ``.h5``). The loader needs this one.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._csr import gather_rows


def _as_str_array(names) -> np.ndarray:
    return np.asarray([str(x) for x in names], dtype=object).astype(str)


def _codes(codes, n: int, what: str) -> np.ndarray:
    if codes is None:
        return np.zeros(n, dtype=np.int64)
    codes = np.asarray(codes)
    if codes.shape != (n,):
        raise ValueError(f"{what} must have one entry per cell ({n}), got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integer codes, got dtype {codes.dtype}")
    return codes.astype(np.int64, copy=False)


class Source:
    """Base class of row sources (see the module docstring)."""

    n_cells: int
    n_genes: int
    var_names: np.ndarray
    obs_names: np.ndarray | None = None
    batch_codes: np.ndarray
    labels_codes: np.ndarray
    batch_categories: list | None = None
    labels_categories: list | None = None
    #: int64/int32 row pointers held in memory; None for stream-only sources
    indptr: np.ndarray | None = None
    indices_dtype = np.dtype(np.int32)
    data_dtype = np.dtype(np.float32)
    direct_gather = False

    @property
    def supports_random_access(self) -> bool:
        return self.indptr is not None and type(self).read_rows is not Source.read_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_cells, self.n_genes)

    def iter_chunks(self, chunk_size: int = 65536):
        """Yield ``(start, csr_chunk)`` over all rows in order."""
        if not self.supports_random_access:
            raise NotImplementedError
        for start in range(0, self.n_cells, chunk_size):
            rows = np.arange(start, min(start + chunk_size, self.n_cells), dtype=np.int64)
            yield start, self.get_rows(rows)
            self.release()

    def read_rows(self, rows, out_indptr, out_indices, out_data) -> None:
        """Copy ``rows`` into preallocated buffers; ``out_indptr`` is already filled."""
        raise NotImplementedError(
            f"{type(self).__name__} can only be streamed; convert it first with "
            "scvi_fast.data.CSRStore.create(path, source) and load the store."
        )

    def get_rows(self, rows) -> sp.csr_matrix:
        """Rows ``rows`` as a scipy CSR matrix in the source's dtypes."""
        from ._csr import row_offsets

        rows = np.ascontiguousarray(rows, dtype=np.int64)
        indptr, nnz = row_offsets(self.indptr, rows)
        indices = np.empty(nnz, dtype=self.indices_dtype)
        data = np.empty(nnz, dtype=self.data_dtype)
        self.read_rows(rows, indptr, indices, data)
        return sp.csr_matrix((data, indices.astype(np.int32, copy=False), indptr),
                             shape=(rows.size, self.n_genes))

    def release(self) -> None:
        """Drop cached pages of memory-mapped files from this process (no-op by default)."""

    def with_codes(self, batch_codes=None, labels_codes=None) -> Source:
        """A shallow copy with the given covariate codes replacing the stored ones."""
        out = copy.copy(self)
        if batch_codes is not None:
            out.batch_codes = _codes(batch_codes, self.n_cells, "batch_codes")
            out.batch_categories = None
        if labels_codes is not None:
            out.labels_codes = _codes(labels_codes, self.n_cells, "labels_codes")
            out.labels_categories = None
        return out

    def _set_meta(self, var_names, obs_names, batch_codes, labels_codes):
        self.var_names = _as_str_array(var_names) if var_names is not None else _as_str_array(
            range(self.n_genes)
        )
        if self.var_names.shape != (self.n_genes,):
            raise ValueError(f"{len(self.var_names)} gene names for {self.n_genes} genes")
        self.obs_names = None if obs_names is None else np.asarray(obs_names)
        self.batch_codes = _codes(batch_codes, self.n_cells, "batch_codes")
        self.labels_codes = _codes(labels_codes, self.n_cells, "labels_codes")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_cells={self.n_cells}, n_genes={self.n_genes})"


class ArraySource(Source):
    """Rows of a CSR matrix held as three arrays (in memory or memory-mapped)."""

    #: the loader gathers minibatches straight from ``indptr``/``indices``/``data``
    direct_gather = True

    def __init__(self, indptr, indices, data, n_genes, var_names=None, obs_names=None,
                 batch_codes=None, labels_codes=None):
        self.indptr = indptr
        self.indices = indices
        self.data = data
        self.n_cells = int(indptr.shape[0] - 1)
        self.n_genes = int(n_genes)
        self.indices_dtype = indices.dtype
        self.data_dtype = data.dtype
        self._set_meta(var_names, obs_names, batch_codes, labels_codes)

    @classmethod
    def from_matrix(cls, matrix, **kwargs) -> ArraySource:
        """From a scipy sparse matrix (any format) or a dense array."""
        if sp.issparse(matrix):
            m = matrix.tocsr() if matrix.format != "csr" else matrix
        else:
            m = sp.csr_matrix(np.asarray(matrix))
        if not m.has_canonical_format:
            # duplicated entries would reach the model as split counts (log1p(a) + log1p(b)
            # instead of log1p(a + b)); sum them on a copy, leaving the caller's matrix alone
            m = m.copy()
            m.sum_duplicates()
        return cls(m.indptr, m.indices, m.data, m.shape[1], **kwargs)

    def read_rows(self, rows, out_indptr, out_indices, out_data) -> None:
        gather_rows(self.indptr, self.indices, self.data, rows,
                    out=(out_indptr, out_indices, out_data))


class H5CSRSource(Source):
    """Rows of a CSR matrix in an HDF5 file (backed ``.h5ad`` X/layer, 10x ``.h5``).

    ``indptr`` is read once (8 bytes per cell); row data is read on demand as one HDF5 slice
    per run of consecutive rows, so sorted row blocks cost one read each.
    """

    def __init__(self, path, group: str, n_genes: int, var_names=None, obs_names=None,
                 batch_codes=None, labels_codes=None, data_name="data", indices_name="indices",
                 indptr_name="indptr"):
        import h5py

        self.path = str(path)
        self.group = group
        self._names = (data_name, indices_name, indptr_name)
        self._file = None
        with h5py.File(self.path, "r") as f:
            g = f[group]
            self.indptr = g[indptr_name][...].astype(np.int64)
            self.indices_dtype = g[indices_name].dtype
            self.data_dtype = g[data_name].dtype
            nnz = g[data_name].shape[0]
        if self.indptr[0] != 0 or self.indptr[-1] != nnz:
            raise ValueError(f"{path}:{group}: indptr does not span the {nnz} stored values")
        self.n_cells = int(self.indptr.shape[0] - 1)
        self.n_genes = int(n_genes)
        self._set_meta(var_names, obs_names, batch_codes, labels_codes)

    def _datasets(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        g = self._file[self.group]
        return g[self._names[0]], g[self._names[1]]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def read_rows(self, rows, out_indptr, out_indices, out_data) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        d_data, d_indices = self._datasets()
        brk = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], brk])
        stops = np.concatenate([brk, [rows.size]])
        for a, b in zip(starts.tolist(), stops.tolist()):
            s = int(self.indptr[rows[a]])
            e = int(self.indptr[rows[b - 1] + 1])
            if e > s:
                o = int(out_indptr[a])
                d_indices.read_direct(out_indices, np.s_[s:e], np.s_[o : o + e - s])
                d_data.read_direct(out_data, np.s_[s:e], np.s_[o : o + e - s])


class ChunkSource(Source):
    """A stream-only source given by a function that yields ``(start, csr_chunk)``."""

    def __init__(self, chunk_fn, n_cells, n_genes, var_names=None, obs_names=None,
                 batch_codes=None, labels_codes=None, data_dtype=np.float32):
        self._chunk_fn = chunk_fn
        self.n_cells = int(n_cells)
        self.n_genes = int(n_genes)
        self.data_dtype = np.dtype(data_dtype)
        self._set_meta(var_names, obs_names, batch_codes, labels_codes)

    def iter_chunks(self, chunk_size: int = 65536):
        yield from self._chunk_fn(chunk_size)


def _categorical_codes(obs, key):
    if key is None:
        return None, None
    if key not in obs:
        raise KeyError(f"obs has no column {key!r}; available: {list(obs.columns)}")
    import pandas as pd

    cat = pd.Categorical(obs[key])
    if (cat.codes < 0).any():
        raise ValueError(f"obs[{key!r}] has missing values; fill them before conversion")
    return cat.codes.astype(np.int64), [str(c) for c in cat.categories]


def _from_h5ad(path, layer=None, batch_key=None, labels_key=None) -> Source:
    import h5py
    from anndata.io import read_elem

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
    bc, bcat = _categorical_codes(obs, batch_key)
    lc, lcat = _categorical_codes(obs, labels_key)
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
        import h5py

        with h5py.File(path, "r") as f:
            d = f[group]
            for start in range(0, d.shape[0], chunk_size):
                yield start, sp.csr_matrix(d[start : start + chunk_size])

    return chunks


def _anndata_source(adata, layer=None, batch_key=None, labels_key=None) -> Source:
    if getattr(adata, "isbacked", False):
        return _from_h5ad(adata.filename, layer, batch_key, labels_key)
    m = adata.X if layer is None else adata.layers[layer]
    if m is None:
        raise ValueError("adata.X is None; pass layer= to choose a count layer")
    if not (sp.issparse(m) or isinstance(m, np.ndarray)):
        # backed sparse datasets or other array types
        m = m.to_memory() if hasattr(m, "to_memory") else m[...]
    bc, bcat = _categorical_codes(adata.obs, batch_key)
    lc, lcat = _categorical_codes(adata.obs, labels_key)
    src = ArraySource.from_matrix(
        m, var_names=adata.var_names, obs_names=adata.obs_names.to_numpy(), batch_codes=bc,
        labels_codes=lc,
    )
    src.batch_categories, src.labels_categories = bcat, lcat
    return src


def as_source(obj, layer: str | None = None, batch_codes=None, labels_codes=None,
              batch_key: str | None = None, labels_key: str | None = None) -> Source:
    """Wrap anything the data path reads as a :class:`Source`.

    Parameters
    ----------
    obj
        An in-memory AnnData (CSR, CSC or dense ``X`` or ``layer``), a backed AnnData, a path to
        an ``.h5ad``, a 10x ``.h5``, a ``.mtx``/``.mtx.gz`` file or 10x mtx directory, a
        :class:`CSRStore` or a path to a store directory, a TileDB-SOMA ``ExperimentAxisQuery``,
        a scipy sparse matrix or dense array, or a :class:`Source`.
    layer
        AnnData layer holding the counts (default ``X``).
    batch_codes, labels_codes
        Integer codes per cell; override the stored ones.
    batch_key, labels_key
        obs columns to read codes (and categories) from, for AnnData / h5ad / SOMA inputs.

    Returns
    -------
    Source
        With ``n_cells``, ``n_genes``, ``var_names``, ``batch_codes``, ``labels_codes``.
    """
    from ._store import CSRStore

    src: Source
    if isinstance(obj, Source):
        src = obj
    elif isinstance(obj, CSRStore):
        src = obj.source
    elif isinstance(obj, (str, os.PathLike)):
        src = _path_source(Path(obj), layer, batch_key, labels_key)
    elif sp.issparse(obj) or isinstance(obj, np.ndarray):
        src = ArraySource.from_matrix(obj)
    elif type(obj).__name__ == "AnnData" or hasattr(obj, "obs_names") and hasattr(obj, "X"):
        src = _anndata_source(obj, layer, batch_key, labels_key)
    elif type(obj).__name__ == "ExperimentAxisQuery":
        from ._readers import soma_source

        src = soma_source(obj, batch_key=batch_key, labels_key=labels_key)
    else:
        raise TypeError(f"cannot read cells from an object of type {type(obj).__name__}")
    if batch_codes is not None or labels_codes is not None:
        src = src.with_codes(batch_codes, labels_codes)
    return src


def _path_source(path: Path, layer, batch_key, labels_key) -> Source:
    from ._readers import read_10x_h5_source, read_mtx_source
    from ._store import CSRStore

    if not path.exists():
        raise FileNotFoundError(path)
    name = path.name.lower()
    if path.is_dir():
        if (path / "manifest.json").exists():
            return CSRStore.open(path).source
        if any((path / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
            return read_mtx_source(path)
        raise ValueError(f"{path} is neither a CSR store nor a 10x mtx directory")
    if name.endswith(".h5ad"):
        return _from_h5ad(path, layer, batch_key, labels_key)
    if name.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as f:
            is_anndata = "X" in f and "obs" in f
        if is_anndata:
            return _from_h5ad(path, layer, batch_key, labels_key)
        return read_10x_h5_source(path)
    if name.endswith((".mtx", ".mtx.gz")):
        return read_mtx_source(path)
    raise ValueError(f"unrecognised input {path}: expected .h5ad, .h5, .mtx(.gz) or a store")
