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
import math
import mmap
import os
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._checksum import crc32c
from ._source import ArraySource

FORMAT = "scvi_fast.csr_store"
FORMAT_VERSION = 1
_CRC_BLOCK = 1 << 24
#: cells per checksummed chunk of indices.bin and data.bin: small enough that the first read
#: of a random block of rows checks little beyond it, large enough that the checksums cost
#: 8 bytes per 256 cells
CHUNK_ROWS = 256
#: the per-cell arrays: read whole when a store opens, so checked whole there
_PER_CELL = ("indptr", "batch", "labels", "source_rows")
#: the per-chunk checksum arrays, by the array they cover
_CHUNK_CRC = {"indices": "indices_crc32c", "data": "data_crc32c"}
#: elements checked per run of chunks before the mapped pages are dropped
_CHECK_READ = 1 << 22


class StoreCorruptError(ValueError):
    """A store directory is incomplete, truncated or fails its checksums."""


def _recreate(path) -> str:
    return (f"Re-create the store from its source: scvi_fast.data.CSRStore.create('{path}', "
            f"SOURCE, overwrite=True), or `scvi-fast convert SOURCE --out {path} --overwrite`.")


def manifest_crc(manifest: dict) -> int:
    """CRC-32 of a manifest's canonical JSON, leaving out its own ``manifest_crc32`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


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


def _member(path: Path, name, what: str = "file") -> Path:
    """``path / name``, refusing any name that is not a file of the store folder itself."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or os.sep in name):
        raise StoreCorruptError(
            f"{path}/manifest.json names the {what} {name!r}, which is not a file name inside "
            f"the store folder: the manifest is damaged or was edited. {_recreate(path)}"
        )
    full = path / name
    if full.resolve().parent != path.resolve():
        raise StoreCorruptError(
            f"{path}: {name} resolves to {full.resolve()}, outside the store folder (a link "
            f"out of the store); a store reads only its own files. {_recreate(path)}"
        )
    return full


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


def _read_checked(path: Path, spec: dict | None, store: Path) -> bytes:
    """The bytes of a small file, checked against its manifest entry (when it has one)."""
    raw = path.read_bytes()
    if spec is not None and zlib.crc32(raw) != spec.get("crc32"):
        raise StoreCorruptError(
            f"{path} fails its CRC-32 checksum: the file is damaged. {_recreate(store)}"
        )
    return raw


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
        self._crc = {k: arrays.get(v) for k, v in _CHUNK_CRC.items()} if self.chunk_rows else None
        self._rows_per_chunk = int(self.chunk_rows or CHUNK_ROWS)
        n_chunks = math.ceil(self.n_cells / self._rows_per_chunk)
        self._checked = np.zeros(n_chunks, dtype=bool)
        self._n_unchecked = n_chunks if check_reads else 0
        self._check_lock = threading.Lock()
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
        if not path.is_dir():
            raise FileNotFoundError(f"no CSR store at {path}")
        mpath = path / "manifest.json"
        if not mpath.exists():
            raise StoreCorruptError(
                f"{path} has no manifest.json: it is not a CSR store, or its conversion did not "
                "finish. Re-create it with scvi_fast.data.CSRStore.create(...)."
            )
        try:
            with open(_member(path, "manifest.json"), encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"{mpath} is corrupt ({err}). {_recreate(path)}") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreCorruptError(f"{mpath} does not describe a {FORMAT}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreCorruptError(
                f"{path} has format version {manifest.get('format_version')}; this scvi_fast "
                f"reads version {FORMAT_VERSION}. Re-create the store."
            )
        if "manifest_crc32" in manifest and manifest["manifest_crc32"] != manifest_crc(manifest):
            raise StoreCorruptError(f"{mpath} fails its checksum: the manifest is damaged or "
                                    f"was edited. {_recreate(path)}")
        try:
            n_cells, nnz = int(manifest["n_cells"]), int(manifest["nnz"])
            expect = {"indptr": n_cells + 1, "indices": nnz, "data": nnz, "batch": n_cells,
                      "labels": n_cells}
            if "source_rows" in manifest["arrays"]:
                expect["source_rows"] = n_cells
            if manifest.get("chunk_rows") is not None:
                rows = int(manifest["chunk_rows"])
                if rows < 1 or manifest.get("chunk_checksum") != "crc32c":
                    raise StoreCorruptError(
                        f"{path}: unknown chunk checksums ({manifest.get('chunk_checksum')!r} "
                        f"over {rows} cells); this scvi_fast reads CRC-32C. {_recreate(path)}")
                for name in _CHUNK_CRC.values():
                    expect[name] = math.ceil(n_cells / rows)
            for name, n in expect.items():
                if manifest["arrays"][name]["shape"] != [n]:
                    raise StoreCorruptError(f"{path}: manifest shape of {name} is inconsistent")
            specs = manifest["arrays"]
            for spec in specs.values():
                spec["file"], spec["nbytes"], spec["dtype"]  # noqa: B018 - present
        except KeyError as err:
            raise StoreCorruptError(f"{mpath} lacks entry {err}. {_recreate(path)}") from err
        for name, spec in specs.items():
            fpath = _member(path, spec["file"])
            if not fpath.is_file():
                raise StoreCorruptError(f"{path}: file {spec['file']} is missing. "
                                        f"{_recreate(path)}")
            size = fpath.stat().st_size
            if size != spec["nbytes"]:
                raise StoreCorruptError(
                    f"{path}: {spec['file']} has {size} bytes, the manifest says "
                    f"{spec['nbytes']}: the store is truncated or was modified. Re-create it."
                )
            # the per-cell files and chunk checksums are small and read whole anyway; the
            # counts are checked chunk by chunk as they are read (or now, with verify)
            whole = name not in _CHUNK_CRC or (verify and "chunk_rows" not in manifest)
            if whole and _file_crc(fpath) != spec.get("crc32"):
                raise StoreCorruptError(
                    f"{fpath} fails its CRC-32 checksum: the file is damaged. {_recreate(path)}"
                )
        if not (path / "var_names.json").exists():
            raise StoreCorruptError(f"{path}: var_names.json is missing. {_recreate(path)}")
        if "chunk_rows" not in manifest:
            warnings.warn(
                f"{path} has no chunk checksums (written by an older scvi_fast), so its counts "
                f"are not checked as they are read; re-convert it to add them: `scvi-fast "
                f"convert {path} --out NEW_STORE`", UserWarning, stacklevel=2)
        store = cls(path, manifest, check_reads=check_reads)
        store._check_structure()
        if verify:
            store._check_chunks(np.arange(store._checked.size), force=True)
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
        if not self._n_unchecked:
            return
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        chunks = np.unique(rows // self._rows_per_chunk)
        todo = chunks[~self._checked[chunks]]
        if todo.size:
            self._check_chunks(todo)

    def _chunk_rows_range(self, c: int) -> tuple[int, int]:
        r = self._rows_per_chunk
        return c * r, min((c + 1) * r, self.n_cells)

    def _check_chunks(self, todo: np.ndarray, force: bool = False) -> None:
        """Check chunks ``todo`` (sorted ids), in runs of consecutive chunks."""
        with self._check_lock:
            if not force:
                todo = todo[~self._checked[todo]]
            if not todo.size:
                return
            ip, r = self.indptr, self._rows_per_chunk
            self._check_sizes()
            brk = np.flatnonzero(np.diff(todo) != 1) + 1
            for run in np.split(todo, brk):
                c, stop = int(run[0]), int(run[-1]) + 1
                while c < stop:
                    # as many whole chunks as fit a bounded span (at least one)
                    e0 = int(ip[c * r])
                    last = int(np.searchsorted(ip[(c + 1) * r :: r], e0 + _CHECK_READ, "right"))
                    c1 = min(stop, c + max(1, last))
                    self._check_run(c, c1)
                    newly = int(np.count_nonzero(~self._checked[c:c1]))
                    self._checked[c:c1] = True
                    self._n_unchecked = max(0, self._n_unchecked - newly)
                    c = c1

    def _check_run(self, c0: int, c1: int) -> None:
        """Check consecutive chunks ``c0:c1`` of indices and data."""
        ip = self.indptr
        base = int(ip[c0 * self._rows_per_chunk])
        end = int(ip[min(c1 * self._rows_per_chunk, self.n_cells)])
        for name in ("indices", "data"):
            # checksummed straight from the memory map (about twice as fast as reading a
            # copy), whose pages are dropped again at once
            span = (self.indices if name == "indices" else self.data)[base:end]
            try:
                self._check_span(name, span, base, c0, c1)
            finally:
                self._drop_pages(name, base * span.itemsize, end * span.itemsize)

    def _drop_pages(self, name: str, start: int, stop: int) -> None:
        """Unmap bytes ``start:stop`` of a mapped file from this process (page cache kept)."""
        mm = self._maps.get(name)
        if mm is None or stop <= start:
            return
        lo = start - start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, min(stop, len(mm)) - lo)
        except (AttributeError, OSError, ValueError):
            pass

    def _check_span(self, name: str, span: np.ndarray, base: int, c0: int, c1: int) -> None:
        """Chunks ``c0:c1`` of one file (``span`` starts at element ``base``)."""
        ip, r = self.indptr, self._rows_per_chunk
        fname = self.path / self.manifest["arrays"][name]["file"]
        if self._crc is not None:
            expect = self._crc[name]
            for c in range(c0, c1):
                a, b = self._chunk_rows_range(c)
                s, e = int(ip[a]) - base, int(ip[b]) - base
                if crc32c(span[s:e]) != int(expect[c]):
                    raise StoreCorruptError(
                        f"{fname}: chunk {c} (cells {a}-{b - 1}, bytes "
                        f"{(s + base) * span.itemsize}-{(e + base) * span.itemsize - 1}) fails "
                        f"its CRC-32C checksum: the file is damaged. {_recreate(self.path)}")
        elif name == "indices" and span.size and int(span.max()) >= self.n_genes:
            # without checksums (an older store) at least the gene indices are checked; with
            # them, the writer checked the indices and the checksum that they are as written
            bad = int(np.argmax(span >= self.n_genes))
            cell = int(np.searchsorted(ip, bad + base, "right")) - 1
            a, b = self._chunk_rows_range(cell // r)
            raise StoreCorruptError(
                f"{fname}: gene index {int(span[bad])} of cell {cell} (chunk {cell // r}, "
                f"cells {a}-{b - 1}) is not below n_genes={self.n_genes}: the file is "
                f"damaged. {_recreate(self.path)}")

    def _check_sizes(self) -> None:
        """Refuse to read mapped counts from files truncated since the store was opened (a
        read past their end would kill the process)."""
        for name in ("indices", "data"):
            spec = self.manifest["arrays"][name]
            try:
                size = os.stat(self.path / spec["file"]).st_size
            except FileNotFoundError:
                size = -1
            if size < spec["nbytes"]:
                raise StoreCorruptError(
                    f"{self.path / spec['file']} is shorter than when the store was opened "
                    f"({size} of {spec['nbytes']} bytes): the store was truncated or removed "
                    f"while in use. {_recreate(self.path)}")

    def verify(self) -> None:
        """Check the whole store now: every file and every chunk; raise on damage."""
        CSRStore.open(self.path, verify=True)
        self._checked[:] = True
        self._n_unchecked = 0

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
