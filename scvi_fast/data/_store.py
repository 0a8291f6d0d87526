"""The on-disk CSR store: a directory of memory-mappable arrays plus a JSON manifest.

Layout (format version 1)::

    STORE/
      manifest.json      format, version, shapes, dtypes, byte sizes, CRC-32 of every file,
                         covariate keys and categories
      indptr.bin         int64, n_cells + 1
      indices.bin        uint8/uint16/uint32 (smallest that holds n_genes - 1)
      data.bin           uint8/uint16/uint32 for integer counts (smallest that holds the
                         maximum), float32 otherwise
      batch.bin          int32 batch codes per cell
      labels.bin         int32 label codes per cell
      var_names.json     gene names
      obs_names.txt      cell names, one per line (optional)
      source_rows.bin    int64 source row of each stored cell (only for pre-shuffled stores)

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
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._source import ArraySource

FORMAT = "scvi_fast.csr_store"
FORMAT_VERSION = 1
_CRC_BLOCK = 1 << 24


class StoreCorruptError(ValueError):
    """A store directory is incomplete, truncated or fails its checksums."""


def _map(path: Path, dtype: np.dtype, n: int):
    if n == 0:
        return np.empty(0, dtype=dtype), None
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=n), mm


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(_CRC_BLOCK)
            if not raw:
                return crc
            crc = zlib.crc32(raw, crc)


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

    def read_rows(self, rows, out_indptr, out_indices, out_data) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
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
    """

    #: ``CSRStore.create(path, source, ...)`` converts counts into a store. It is defined in
    #: ``_convert`` (``create_store``) and set on the class there: conversion reads its input
    #: through ``as_source``, which opens stores, so it cannot live in this module.
    create: ClassVar[Callable[..., CSRStore]]

    def __init__(self, path, manifest: dict):
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
            arr, mm = _map(self.path / spec["file"], np.dtype(spec["dtype"]), spec["shape"][0])
            arrays[name] = arr
            if mm is not None:
                self._maps[name] = mm
        self.indptr = arrays["indptr"]
        self.indices = arrays["indices"]
        self.data = arrays["data"]
        self.batch_codes = np.asarray(arrays["batch"], dtype=np.int64)
        self.labels_codes = np.asarray(arrays["labels"], dtype=np.int64)
        self.source_rows = arrays.get("source_rows")
        with open(self.path / "var_names.json", encoding="utf-8") as fh:
            self.var_names = np.asarray(json.load(fh), dtype=str)
        self._obs_names = None
        self.source = StoreSource(self)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path, verify: bool = False) -> CSRStore:
        """Open a store, checking its manifest, file sizes and row pointers.

        Parameters
        ----------
        path
            The store directory.
        verify
            Also recompute the CRC-32 of every file (reads the whole store).

        Raises
        ------
        StoreCorruptError
            If the store is incomplete, truncated or corrupt.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no CSR store at {path}")
        mpath = path / "manifest.json"
        if not mpath.exists():
            raise StoreCorruptError(
                f"{path} has no manifest.json: it is not a CSR store, or its conversion did not "
                "finish. Re-create it with scvi_fast.data.CSRStore.create(...)."
            )
        try:
            with open(mpath, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"{mpath} is corrupt ({err}); re-create the store") from err
        if manifest.get("format") != FORMAT:
            raise StoreCorruptError(f"{mpath} does not describe a {FORMAT}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreCorruptError(
                f"{path} has format version {manifest.get('format_version')}; this scvi_fast "
                f"reads version {FORMAT_VERSION}. Re-create the store."
            )
        try:
            n_cells, nnz = int(manifest["n_cells"]), int(manifest["nnz"])
            expect = {"indptr": n_cells + 1, "indices": nnz, "data": nnz, "batch": n_cells,
                      "labels": n_cells}
            for name, n in expect.items():
                if manifest["arrays"][name]["shape"] != [n]:
                    raise StoreCorruptError(f"{path}: manifest shape of {name} is inconsistent")
        except KeyError as err:
            raise StoreCorruptError(f"{mpath} lacks entry {err}; re-create the store") from err
        for name, spec in manifest["arrays"].items():
            fpath = path / spec["file"]
            if not fpath.exists():
                raise StoreCorruptError(f"{path}: file {spec['file']} is missing")
            size = fpath.stat().st_size
            if size != spec["nbytes"]:
                raise StoreCorruptError(
                    f"{path}: {spec['file']} has {size} bytes, the manifest says "
                    f"{spec['nbytes']}: the store is truncated or was modified. Re-create it."
                )
            if verify and _file_crc(fpath) != spec["crc32"]:
                raise StoreCorruptError(
                    f"{path}: {spec['file']} fails its CRC-32 checksum: the file is corrupt. "
                    "Re-create the store."
                )
        if not (path / "var_names.json").exists():
            raise StoreCorruptError(f"{path}: var_names.json is missing")
        store = cls(path, manifest)
        ip = store.indptr
        if ip[0] != 0 or ip[-1] != nnz:
            raise StoreCorruptError(f"{path}: indptr does not span 0..{nnz}; the store is corrupt")
        step = 1 << 22
        for a in range(0, n_cells, step):
            if np.any(np.diff(ip[a : a + step + 1]) < 0):
                raise StoreCorruptError(f"{path}: indptr decreases near row {a}; corrupt store")
        return store

    def verify(self) -> None:
        """Recompute every file's checksum and check column indices; raise on mismatch."""
        CSRStore.open(self.path, verify=True)
        step = 1 << 24
        for a in range(0, self.nnz, step):
            chunk = self.indices[a : a + step]
            if chunk.size and int(chunk.max()) >= self.n_genes:
                raise StoreCorruptError(f"{self.path}: column index out of range near {a}")

    # ----------------------------------------------------------------- metadata
    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_cells, self.n_genes)

    @property
    def obs_names(self) -> np.ndarray | None:
        """Cell names (read on first use), or None when the store has none."""
        if self._obs_names is None and self.manifest.get("has_obs_names"):
            with open(self.path / "obs_names.txt", encoding="utf-8") as fh:
                self._obs_names = np.asarray(fh.read().split("\n")[: self.n_cells], dtype=object)
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
