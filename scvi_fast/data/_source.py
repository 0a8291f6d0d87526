"""Row sources: what the loader and the store writer read cells from.

A source knows its shape, gene names, per-cell covariate codes and how to produce rows. Two
abilities exist:

* ``iter_chunks(chunk_size)``: stream the rows in order as CSR chunks (every source);
* ``read_rows(rows, out_indptr, out_indices, out_data)``: copy arbitrary rows into a
  preallocated CSR buffer (sources with random row access: in-memory CSR, the on-disk store,
  backed ``.h5ad`` and 10x ``.h5``). The loader needs this one.

This module is the leaf of the data path: it holds the base classes and the sources of CSR
arrays and HDF5 files. Readers of file formats live in ``_readers``, the store in ``_store``,
and ``as_source`` (which turns a path, an AnnData or a store into a source) in ``_open``.
"""

from __future__ import annotations

import copy
import os

import h5py
import numpy as np
import scipy.sparse as sp

from ._csr import gather_rows, row_offsets


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


def _covariate_array(values, n: int, what: str, integer: bool) -> np.ndarray:
    """``(n, k)`` int64 codes or float32 values of per-cell covariates, checked."""
    a = np.asarray(values)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != n:
        raise ValueError(f"{what} must have one row per cell ({n}), got shape {a.shape}")
    if integer:
        if a.dtype.kind not in "iu":
            raise TypeError(f"{what} must be integer codes, got dtype {a.dtype}")
        return np.ascontiguousarray(a, dtype=np.int64)
    if a.dtype.kind not in "iuf" or not np.isfinite(a).all():
        raise ValueError(f"{what} must be finite numbers")
    return np.ascontiguousarray(a, dtype=np.float32)


class Source:
    """Base class of row sources (see the module docstring).

    Beside the batch and label codes a source may carry per-cell model inputs that minibatches
    then hold: ``cat_covs`` (``(n_cells, n_cat)`` int64 codes of extra categorical
    covariates), ``cont_covs`` (``(n_cells, n_cont)`` float32) and ``size_factor``
    (``(n_cells,)`` float32, positive); None where absent (see :meth:`with_covariates`).
    """

    n_cells: int
    n_genes: int
    var_names: np.ndarray
    obs_names: np.ndarray | None = None
    batch_codes: np.ndarray
    labels_codes: np.ndarray
    batch_categories: list | None = None
    labels_categories: list | None = None
    cat_covs: np.ndarray | None = None
    cont_covs: np.ndarray | None = None
    size_factor: np.ndarray | None = None
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

    def check_rows(self, rows) -> None:
        """Check the stored bytes of ``rows`` before they are gathered without
        :meth:`read_rows` (sources that verify what they read override this; no-op here)."""

    def get_rows(self, rows) -> sp.csr_matrix:
        """Rows ``rows`` as a scipy CSR matrix in the source's dtypes."""
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

    def with_covariates(self, cat_covs=None, cont_covs=None, size_factor=None) -> Source:
        """A shallow copy carrying per-cell covariates (see the class docstring); None leaves
        that input as it is."""
        out = copy.copy(self)
        n = self.n_cells
        if cat_covs is not None:
            out.cat_covs = _covariate_array(cat_covs, n, "cat_covs", integer=True)
        if cont_covs is not None:
            out.cont_covs = _covariate_array(cont_covs, n, "cont_covs", integer=False)
        if size_factor is not None:
            sf = _covariate_array(size_factor, n, "size_factor", integer=False)[:, 0]
            if sf.size and not (sf > 0).all():
                raise ValueError("size factors must be positive (the library is their log)")
            out.size_factor = sf
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
