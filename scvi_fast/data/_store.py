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

A store is written into a hidden temporary directory beside its destination and renamed into
place only once complete, so an interrupted conversion never leaves a directory that opens.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import uuid
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._counts import CountChecker
from ._source import ArraySource, Source, as_source

FORMAT = "scvi_fast.csr_store"
FORMAT_VERSION = 1
_CRC_BLOCK = 1 << 24


def smallest_uint(max_value: int) -> np.dtype:
    """Smallest unsigned integer dtype holding ``max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise OverflowError(max_value)


def _data_dtype_for(values: np.ndarray) -> np.dtype:
    if values.size == 0:
        return np.dtype(np.uint8)
    if values.dtype.kind in "iu":
        if values.min() < 0:
            return np.dtype(np.float32)
        return smallest_uint(int(values.max()))
    if np.all(values == np.floor(values)) and values.min() >= 0 and values.max() < 2**32:
        return smallest_uint(int(values.max()))
    return np.dtype(np.float32)


def _wider(a: np.dtype, b: np.dtype) -> np.dtype:
    if a == b:
        return a
    if a.kind == "f" or b.kind == "f":
        return np.dtype(np.float32)
    return a if a.itemsize >= b.itemsize else b


class _ArrayFile:
    """An append-only binary array file with an incremental CRC-32 and in-place upcasting."""

    def __init__(self, path: Path, dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.n = 0
        self.crc = 0
        self._f = open(path, "wb")

    def append(self, arr: np.ndarray) -> None:
        buf = np.ascontiguousarray(arr, dtype=self.dtype)
        self._f.write(memoryview(buf).cast("B"))
        self.crc = zlib.crc32(memoryview(buf).cast("B"), self.crc)
        self.n += buf.size

    def upcast(self, dtype) -> None:
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return
        self._f.close()
        old = self.path.with_suffix(".old")
        os.replace(self.path, old)
        prev, self.dtype, self.n, self.crc = self.dtype, dtype, 0, 0
        self._f = open(self.path, "wb")
        step = _CRC_BLOCK
        with open(old, "rb") as f:
            while True:
                raw = f.read(step * prev.itemsize)
                if not raw:
                    break
                self.append(np.frombuffer(raw, dtype=prev))
        old.unlink()

    def close(self) -> dict:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return {"file": self.path.name, "dtype": self.dtype.str, "shape": [self.n],
                "nbytes": self.n * self.dtype.itemsize, "crc32": self.crc}


class StoreWriter:
    """Writes a store from CSR row chunks, in bounded memory, atomically.

    Use as a context manager; on an exception the temporary directory is removed and nothing
    appears at ``path``.
    """

    def __init__(self, path, n_genes: int, var_names, batch_key=None, batch_categories=None,
                 labels_key=None, labels_categories=None, check: bool = True,
                 overwrite: bool = False, with_obs_names: bool = True, extra: dict | None = None):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        self.overwrite = overwrite
        self.n_genes = int(n_genes)
        self.var_names = [str(v) for v in var_names]
        if len(self.var_names) != self.n_genes:
            raise ValueError(f"{len(self.var_names)} gene names for {self.n_genes} genes")
        self.meta = {"batch_key": batch_key, "batch_categories": batch_categories,
                     "labels_key": labels_key, "labels_categories": labels_categories,
                     **(extra or {})}
        self.checker = CountChecker(what="the counts") if check else None
        self.n_cells = 0
        self.nnz = 0
        self.files = {
            "indptr": _ArrayFile(self.tmp / "indptr.bin", np.int64),
            "indices": _ArrayFile(self.tmp / "indices.bin", smallest_uint(max(self.n_genes - 1, 0))),
            "data": _ArrayFile(self.tmp / "data.bin", np.uint8),
            "batch": _ArrayFile(self.tmp / "batch.bin", np.int32),
            "labels": _ArrayFile(self.tmp / "labels.bin", np.int32),
        }
        self.files["indptr"].append(np.zeros(1, dtype=np.int64))
        self._obs = open(self.tmp / "obs_names.txt", "w", encoding="utf-8") if with_obs_names else None
        self._source_rows = None

    def add(self, chunk, batch_codes=None, labels_codes=None, obs_names=None,
            source_rows=None) -> None:
        """Append a chunk of cells (a scipy CSR matrix with ``n_genes`` columns)."""
        if not sp.issparse(chunk) or chunk.format != "csr":
            chunk = sp.csr_matrix(chunk)
        if not chunk.has_canonical_format:  # sorted genes, duplicates summed
            chunk = chunk.copy()
            chunk.sum_duplicates()
        n = chunk.shape[0]
        if chunk.shape[1] != self.n_genes:
            raise ValueError(f"chunk has {chunk.shape[1]} genes, the store {self.n_genes}")
        if self.checker is not None:
            self.checker.update(self.n_cells, chunk)
        data = chunk.data
        f = self.files
        need = _wider(f["data"].dtype, _data_dtype_for(data))
        f["data"].upcast(need)
        indptr = chunk.indptr.astype(np.int64)
        f["indptr"].append(indptr[1:] - indptr[0] + self.nnz)
        lo, hi = int(indptr[0]), int(indptr[-1])
        f["indices"].append(chunk.indices[lo:hi])
        f["data"].append(data[lo:hi])
        f["batch"].append(np.zeros(n, np.int32) if batch_codes is None else batch_codes)
        f["labels"].append(np.zeros(n, np.int32) if labels_codes is None else labels_codes)
        if self._obs is not None:
            if obs_names is None:
                obs_names = np.arange(self.n_cells, self.n_cells + n).astype(str)
            for name in obs_names:
                s = str(name)
                if "\n" in s:
                    raise ValueError(f"cell name {s!r} contains a newline")
                self._obs.write(s + "\n")
        if source_rows is not None:
            if self._source_rows is None:
                self._source_rows = _ArrayFile(self.tmp / "source_rows.bin", np.int64)
            self._source_rows.append(source_rows)
        self.n_cells += n
        self.nnz += hi - lo

    def close(self) -> CSRStore:
        """Validate, write the manifest and move the store into place."""
        if self.checker is not None:
            self.checker.finish()
        arrays = {k: v.close() for k, v in self.files.items()}
        if self._source_rows is not None:
            arrays["source_rows"] = self._source_rows.close()
        if self._obs is not None:
            self._obs.close()
        with open(self.tmp / "var_names.json", "w", encoding="utf-8") as fh:
            json.dump(self.var_names, fh)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "nnz": self.nnz,
            "arrays": arrays,
            "has_obs_names": self._obs is not None,
            **self.meta,
        }
        with open(self.tmp / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if self.path.exists():
            trash = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(self.path, trash)
            os.replace(self.tmp, self.path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return CSRStore.open(self.path)

    def abort(self) -> None:
        for v in self.files.values():
            if not v._f.closed:
                v._f.close()
        if self._obs is not None and not self._obs.closed:
            self._obs.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


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
        import anndata as ad
        import pandas as pd

        rows = np.arange(self.n_cells) if rows is None else np.asarray(rows)
        X = self.to_scipy(rows)
        obs = pd.DataFrame(index=pd.Index(
            self.obs_names[rows] if self.obs_names is not None else rows.astype(str)
        ).astype(str))
        for key, cats, codes in ((self.batch_key, self.batch_categories, self.batch_codes),
                                 (self.labels_key, self.labels_categories, self.labels_codes)):
            if key is not None:
                c = codes[rows]
                obs[key] = (pd.Categorical.from_codes(c, cats) if cats is not None
                            else pd.Categorical(c))
        var = pd.DataFrame(index=pd.Index(self.var_names))
        return ad.AnnData(X=X, obs=obs, var=var)

    # ------------------------------------------------------------------ writing
    @classmethod
    def create(cls, path, source, batch_key: str | None = None, labels_key: str | None = None,
               genes=None, shuffle: bool = False, chunk_size: int = 16384,
               layer: str | None = None, seed: int = 0, check: bool = True,
               overwrite: bool = False) -> CSRStore:
        """Convert counts into a store at ``path``, in bounded memory, atomically.

        Parameters
        ----------
        path
            Destination directory (must not exist unless ``overwrite``).
        source
            An AnnData (in memory or backed), a path to ``.h5ad`` / 10x ``.h5`` / ``.mtx(.gz)``,
            another store, a TileDB-SOMA ``ExperimentAxisQuery``, or a :class:`Source`.
        batch_key, labels_key
            obs columns stored as covariate codes with their categories.
        genes
            Keep only these genes, in this order: gene names, integer positions or a boolean
            mask (e.g. the highly variable genes).
        shuffle
            Write cells in a random order (seeded by ``seed``); ``source_rows`` records the
            original row of each stored cell.
        chunk_size
            Cells converted per chunk; bounds memory.
        layer
            AnnData layer holding the counts.
        check
            Validate the counts while writing (see :func:`check_counts`).
        overwrite
            Replace an existing store at ``path`` (only once the new one is complete).

        Returns
        -------
        CSRStore
            The opened store.
        """
        src = as_source(source, layer=layer, batch_key=batch_key, labels_key=labels_key)
        cols = _gene_positions(src, genes)
        var_names = src.var_names if cols is None else src.var_names[cols]
        if shuffle and not isinstance(src, ArraySource):
            # random row access on HDF5/SOMA is slow: stage an unshuffled store, shuffle from it
            tmp = Path(path).parent / f".{Path(path).name}.stage-{uuid.uuid4().hex[:12]}"
            try:
                staged = cls.create(tmp, src, genes=genes, chunk_size=chunk_size, check=check,
                                    batch_key=batch_key, labels_key=labels_key)
                return cls.create(path, staged, batch_key=batch_key, labels_key=labels_key,
                                  shuffle=True, chunk_size=chunk_size, seed=seed, check=False,
                                  overwrite=overwrite)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        bcat, lcat = src.batch_categories, src.labels_categories
        if isinstance(src, StoreSource):
            batch_key = batch_key or src.store.batch_key
            labels_key = labels_key or src.store.labels_key
        obs_names = src.obs_names
        writer = StoreWriter(path, len(var_names), var_names, batch_key=batch_key,
                             batch_categories=bcat, labels_key=labels_key,
                             labels_categories=lcat, check=check, overwrite=overwrite,
                             with_obs_names=obs_names is not None)
        with writer:
            if shuffle:
                order = np.random.default_rng(seed).permutation(src.n_cells)
                for a in range(0, src.n_cells, chunk_size):
                    rows = order[a : a + chunk_size]
                    chunk = src.get_rows(rows)
                    src.release()
                    writer.add(_subset_cols(chunk, cols), src.batch_codes[rows],
                               src.labels_codes[rows],
                               None if obs_names is None else obs_names[rows], source_rows=rows)
            else:
                for start, chunk in src.iter_chunks(chunk_size):
                    stop = start + chunk.shape[0]
                    writer.add(_subset_cols(chunk, cols), src.batch_codes[start:stop],
                               src.labels_codes[start:stop],
                               None if obs_names is None else obs_names[start:stop])
            if writer.n_cells != src.n_cells:
                raise ValueError(f"source yielded {writer.n_cells} cells, expected {src.n_cells}")
            return writer.close()


def _gene_positions(src: Source, genes) -> np.ndarray | None:
    if genes is None:
        return None
    if isinstance(genes, (str, os.PathLike)):
        if Path(genes).is_file():
            genes = [g.strip() for g in Path(genes).read_text().splitlines() if g.strip()]
        else:
            genes = [str(genes)]
    g = np.asarray(genes)
    if g.dtype == bool:
        if g.shape != (src.n_genes,):
            raise ValueError(f"gene mask has {g.size} entries for {src.n_genes} genes")
        return np.flatnonzero(g)
    if g.dtype.kind in "iu":
        if g.size and (g.min() < 0 or g.max() >= src.n_genes):
            raise IndexError("gene positions out of range")
        return g.astype(np.int64)
    first: dict[str, int] = {}
    for i, name in enumerate(src.var_names.tolist()):
        first.setdefault(name, i)
    pos = np.array([first.get(x, -1) for x in g.astype(str).tolist()], dtype=np.int64)
    missing = g[pos < 0]
    if missing.size:
        raise KeyError(f"{missing.size} requested genes are not in the data, e.g. "
                       f"{list(missing[:5])}")
    return pos.astype(np.int64)


def _subset_cols(chunk: sp.csr_matrix, cols) -> sp.csr_matrix:
    if cols is None:
        return chunk
    out = chunk[:, cols]
    out.sort_indices()
    return out
