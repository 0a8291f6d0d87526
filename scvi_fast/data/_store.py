"""The on-disk CSR store: a directory of memory-mappable arrays plus a JSON manifest.

Layout (format version 1)::

    STORE/
      manifest.json      format, version, shapes, dtypes, byte sizes, CRC-32 of every file,
                         covariate keys and categories, chunk size, its own CRC-32
      indptr.bin         int64, n_cells + 1
      indices.bin        uint8/uint16/uint32 (smallest that holds n_genes - 1)
      data.bin           uint8/uint16/uint32 for integer counts (smallest that holds the
                         maximum), float32 otherwise
      batch.bin          int32 batch codes per cell
      labels.bin         int32 label codes per cell
      indices_crc32c.bin uint32 CRC-32C of each chunk of ``chunk_rows`` cells of indices.bin
      data_crc32c.bin    uint32 CRC-32C of each chunk of ``chunk_rows`` cells of data.bin
      var_names.json     gene names
      obs_names.txt      cell names, one per line (optional)
      source_rows.bin    int64 source row of each stored cell (only for pre-shuffled stores)

Nothing damaged is used silently. Opening a store checks the manifest (its own checksum,
shapes, sizes, every file inside the store folder), the CRC-32 of the per-cell files (row
pointers, covariate codes, source rows: 16-24 bytes per cell, read whole on open anyway) and
their structure (row pointers rise from 0 to nnz, codes lie within their categories). The
counts themselves (``indices.bin`` and ``data.bin``, nearly all of a store's bytes) are checked
chunk by chunk the first time a chunk is read in a process (CRC-32C and gene indices below
``n_genes``), before any of its rows reaches a minibatch; a chunk is checked once per opened
store. Stores written before chunk checksums existed still open, with a warning: only their
structure is checked as they are read (``verify=True`` checks their whole-file CRC-32).

This module reads the format: opening, validation, memory maps and row access. Writing one
(the chunked :class:`StoreWriter` and :meth:`CSRStore.create`) is in ``_convert``, which sits
above the input dispatcher (a store can be converted from anything ``as_source`` reads,
another store included). A store is written into a hidden temporary directory beside its
destination and renamed into place only once complete, so an interrupted conversion never
leaves a directory that opens.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._source import ArraySource
from ._store_checks import ChunkChecker, _member, _read_checked, read_manifest
from ._store_format import (_CHUNK_CRC, CHUNK_ROWS, FORMAT, StoreCorruptError, _recreate)

def is_store(path) -> bool:
    """Whether ``path`` is a folder holding a CSR store's manifest (damaged or not).

    This is how ``overwrite=True`` recognises a folder it may replace: only a store this
    package wrote is ever replaced, never another folder.
    """
    mpath = Path(path) / "manifest.json"
    if not Path(path).is_dir() or not mpath.is_file():
        return False
    try:
        with open(mpath, "rb") as fh:
            return f'"format": "{FORMAT}"'.encode() in fh.read(1 << 24)
    except OSError:
        return False


def _map(path: Path, dtype: np.dtype, n: int):
    if n == 0:
        return np.empty(0, dtype=dtype), None
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=n), mm


class StoreSource(ArraySource):
    """The rows of a :class:`CSRStore` (memory-mapped)."""

    def __init__(self, store: CSRStore):
        super().__init__(store.indptr, store.indices, store.data, store.n_genes,
                         var_names=store.var_names, obs_names=None,
                         batch_codes=store.batch_codes, labels_codes=store.labels_codes)
        self.store = store
        self.batch_categories = store.batch_categories
        self.labels_categories = store.labels_categories

    @property
    def obs_names(self):
        return self.store.obs_names

    @obs_names.setter
    def obs_names(self, value):
        pass

    #: read with ``pread`` into the loader's staging buffer rather than gathered from the map:
    #: mapped page-cache pages would count towards the process's RSS
    direct_gather = False

    def release(self) -> None:
        self.store.release()

    def check_rows(self, rows) -> None:
        self.store.check_rows(rows)

    def read_rows(self, rows, out_indptr, out_indices, out_data) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        self.store.check_rows(rows)
        fds = self.store._fds()
        if fds is None:
            return super().read_rows(rows, out_indptr, out_indices, out_data)
        brk = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], brk]).tolist()
        stops = np.concatenate([brk, [rows.size]]).tolist()
        ip = self.indptr
        for name, out, fd in (("indices", out_indices, fds[0]), ("data", out_data, fds[1])):
            isz = out.dtype.itemsize
            view = memoryview(out).cast("B")
            for a, b in zip(starts, stops):
                s, e = int(ip[rows[a]]), int(ip[rows[b - 1] + 1])
                if e > s:
                    o = int(out_indptr[a])
                    want = (e - s) * isz
                    got = os.preadv(fd, [view[o * isz : o * isz + want]], s * isz)
                    if got != want:
                        raise StoreCorruptError(
                            f"{self.store.path}: short read of {name} ({got} of {want} bytes); "
                            "the store was truncated after it was opened"
                        )


class CSRStore:
    """A cells x genes count matrix on disk in CSR form, read through memory maps.

    Create one with :meth:`create` (from AnnData, ``.h5ad``, 10x, mtx, TileDB-SOMA) and open
    it with :meth:`open`. Pass the store (or its path) to :class:`CSRLoader` or to the model.

    Attributes
    ----------
    n_cells, n_genes, nnz
        Shape and number of stored non-zeros.
    var_names
        Gene names (numpy array of str).
    batch_key, batch_categories, labels_key, labels_categories
        The covariates recorded at conversion (categories may be None).
    batch_codes, labels_codes
        int64 codes per cell.
    chunk_rows
        Cells per checksummed chunk of the counts (None for a store written before chunk
        checksums existed).
    """

    #: ``CSRStore.create(path, source, ...)`` converts counts into a store. It is defined in
    #: ``_convert`` (``create_store``) and set on the class there: conversion reads its input
    #: through ``as_source``, which opens stores, so it cannot live in this module.
    create: ClassVar[Callable[..., CSRStore]]

    def __init__(self, path, manifest: dict, check_reads: bool = True):
        self.path = Path(path)
        self.manifest = manifest
        self.n_cells = int(manifest["n_cells"])
        self.n_genes = int(manifest["n_genes"])
        self.nnz = int(manifest["nnz"])
        self.batch_key = manifest.get("batch_key")
        self.labels_key = manifest.get("labels_key")
        self.batch_categories = manifest.get("batch_categories")
        self.labels_categories = manifest.get("labels_categories")
        self._maps = {}
        arrays = {}
        for name, spec in manifest["arrays"].items():
            arr, mm = _map(_member(self.path, spec["file"]), np.dtype(spec["dtype"]),
                           spec["shape"][0])
            arrays[name] = arr
            if mm is not None:
                self._maps[name] = mm
        self.indptr = arrays["indptr"]
        self.indices = arrays["indices"]
        self.data = arrays["data"]
        self.batch_codes = np.asarray(arrays["batch"], dtype=np.int64)
        self.labels_codes = np.asarray(arrays["labels"], dtype=np.int64)
        self.source_rows = arrays.get("source_rows")
        files = manifest.get("files", {})
        raw = _read_checked(_member(self.path, "var_names.json"), files.get("var_names.json"),
                            self.path)
        try:
            self.var_names = np.asarray(json.loads(raw), dtype=str)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"{self.path}/var_names.json is damaged ({err}). "
                                    f"{_recreate(self.path)}") from err
        if self.var_names.shape != (self.n_genes,):
            raise StoreCorruptError(f"{self.path}: var_names.json holds {self.var_names.size} "
                                    f"names for {self.n_genes} genes. {_recreate(self.path)}")
        self._obs_names = None
        # chunk checks: which chunks of indices/data this process has checked
        self.chunk_rows = manifest.get("chunk_rows")
        crc = {k: arrays.get(v) for k, v in _CHUNK_CRC.items()} if self.chunk_rows else None
        self._chunks = ChunkChecker(self, crc, self.chunk_rows or CHUNK_ROWS, check_reads)
        self.source = StoreSource(self)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path, verify: bool = False, check_reads: bool = True) -> CSRStore:
        """Open a store, checking its manifest, file sizes, row pointers and covariate codes.

        Parameters
        ----------
        path
            The store directory.
        verify
            Also check every chunk of the counts now (reads the whole store; a store without
            chunk checksums: the CRC-32 of every file).
        check_reads
            Check each chunk of the counts the first time it is read (see the module
            docstring); ``False`` only to measure what the checks cost.

        Raises
        ------
        StoreCorruptError
            If the store is incomplete, truncated or damaged: the message names the file, the
            chunk and its cells where it can, and how to re-create the store.
        """
        path = Path(path)
        manifest = read_manifest(path, verify)
        store = cls(path, manifest, check_reads=check_reads)
        store._check_structure()
        if verify:
            store._chunks.check_chunks(np.arange(store._chunks.checked.size), force=True)
        return store

    def _check_structure(self) -> None:
        """Row pointers rise from 0 to nnz; codes and source rows lie in their ranges."""
        ip, nnz = self.indptr, self.nnz
        if ip[0] != 0 or ip[-1] != nnz:
            raise StoreCorruptError(f"{self.path}: indptr does not span 0..{nnz}; the store is "
                                    f"corrupt. {_recreate(self.path)}")
        step = 1 << 22
        for a in range(0, self.n_cells, step):
            d = np.diff(ip[a : a + step + 1])
            if d.size and d.min() < 0:
                row = a + int(np.argmax(d < 0))
                raise StoreCorruptError(f"{self.path}: indptr decreases at cell {row}; the store "
                                        f"is corrupt. {_recreate(self.path)}")
        for what, codes, cats in (("batch", self.batch_codes, self.batch_categories),
                                  ("labels", self.labels_codes, self.labels_categories)):
            if not codes.size:
                continue
            lo, hi = int(codes.min()), int(codes.max())
            n = None if cats is None else len(cats)
            if lo < 0 or (n is not None and hi >= n):
                bad = int(np.argmax((codes < 0) | (codes >= (n if n is not None else hi + 1))))
                raise StoreCorruptError(
                    f"{self.path}: {what} code {int(codes[bad])} of cell {bad} is outside "
                    f"[0, {n if n is not None else 'inf'}): the codes are damaged. "
                    f"{_recreate(self.path)}")
        sr = self.source_rows
        if sr is not None and sr.size and (int(sr.min()) < 0 or int(sr.max()) >= self.n_cells):
            raise StoreCorruptError(f"{self.path}: source_rows outside [0, {self.n_cells}). "
                                    f"{_recreate(self.path)}")
        self.release()

    def check_rows(self, rows) -> None:
        """Check every chunk holding ``rows`` that this store has not checked yet.

        Called before rows are read (the loader, :meth:`to_scipy`, conversion); costs nothing
        once every chunk has been checked.

        Raises
        ------
        StoreCorruptError
            Naming the file, the chunk and its cells, if a chunk's bytes fail their CRC-32C
            or hold a gene index of ``n_genes`` or more.
        """
        self._chunks.check_rows(rows)

    def verify(self) -> None:
        """Check the whole store now: every file and every chunk; raise on damage."""
        CSRStore.open(self.path, verify=True)
        self._chunks.checked[:] = True
        self._chunks.n_unchecked = 0

    # ----------------------------------------------------------------- metadata
    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_cells, self.n_genes)

    @property
    def obs_names(self) -> np.ndarray | None:
        """Cell names (read on first use), or None when the store has none."""
        if self._obs_names is None and self.manifest.get("has_obs_names"):
            raw = _read_checked(_member(self.path, "obs_names.txt"),
                                self.manifest.get("files", {}).get("obs_names.txt"), self.path)
            names = raw.decode("utf-8").split("\n")[: self.n_cells]
            if len(names) != self.n_cells:
                raise StoreCorruptError(f"{self.path}/obs_names.txt holds {len(names)} names for "
                                        f"{self.n_cells} cells. {_recreate(self.path)}")
            self._obs_names = np.asarray(names, dtype=object)
        return self._obs_names

    def _fds(self):
        """Read-only descriptors of indices.bin and data.bin for this process (or None)."""
        if self.nnz == 0 or not hasattr(os, "preadv"):
            return None
        if getattr(self, "_fd_pid", None) != os.getpid():
            self._fd = (os.open(self.path / self.manifest["arrays"]["indices"]["file"],
                                os.O_RDONLY),
                        os.open(self.path / self.manifest["arrays"]["data"]["file"],
                                os.O_RDONLY))
            self._fd_pid = os.getpid()
        return self._fd

    def __del__(self):
        if getattr(self, "_fd_pid", None) == os.getpid():
            for fd in self._fd:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def release(self) -> None:
        """Drop this process's mappings of store pages (they stay in the page cache)."""
        for mm in self._maps.values():
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass

    def __repr__(self) -> str:
        return (f"CSRStore({str(self.path)!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
                f"nnz={self.nnz}, data={self.data.dtype}, indices={self.indices.dtype})")

    def __len__(self) -> int:
        return self.n_cells

    # ------------------------------------------------------------------ reading
    def to_scipy(self, rows=None) -> sp.csr_matrix:
        """Rows (default all) as a float32 scipy CSR matrix."""
        rows = np.arange(self.n_cells) if rows is None else np.asarray(rows)
        m = self.source.get_rows(rows)
        self.release()
        return sp.csr_matrix((m.data.astype(np.float32), m.indices, m.indptr), shape=m.shape)

    def to_anndata(self, rows=None):
        """The store (or rows of it) as an in-memory AnnData with float32 CSR ``X``.

        Covariates are restored as categorical obs columns under their original keys.
        """
        rows = np.arange(self.n_cells) if rows is None else np.asarray(rows)
        X = self.to_scipy(rows)
        obs = pd.DataFrame(index=pd.Index(
            self.obs_names[rows] if self.obs_names is not None else rows.astype(str)
        ).astype(str))
        for key in (self.batch_key, self.labels_key):
            if key is not None:
                obs[key] = self.obs_column(key, rows)
        var = pd.DataFrame(index=pd.Index(self.var_names))
        return ad.AnnData(X=X, obs=obs, var=var)

    def obs_column(self, key: str, rows=None) -> pd.Categorical:
        """A covariate recorded at conversion, as the categorical obs column it came from.

        Pass it to :func:`codes_for` to code the store's cells in a model's categories exactly
        as an AnnData column is coded (unknown values are an error for both).

        Parameters
        ----------
        key
            The store's ``batch_key`` or ``labels_key``.
        rows
            Cells to return (default all).

        Returns
        -------
        pandas.Categorical
            With the recorded categories, or the codes themselves as categories when the store
            was written from bare integer codes.
        """
        if key is not None and key == self.batch_key:
            codes, cats = self.batch_codes, self.batch_categories
        elif key is not None and key == self.labels_key:
            codes, cats = self.labels_codes, self.labels_categories
        else:
            raise KeyError(f"the store records the covariates {self.batch_key!r} and "
                           f"{self.labels_key!r}, not {key!r}")
        if rows is not None:
            codes = codes[np.asarray(rows)]
        return pd.Categorical.from_codes(codes, cats) if cats is not None else pd.Categorical(codes)
