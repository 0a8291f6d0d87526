"""Conversion into a CSR store: the chunked :class:`StoreWriter` and :func:`create_store`.

``create_store`` is the public ``CSRStore.create``: it reads its input through ``as_source``
(which itself opens stores), so it lives above both the store format and the dispatcher and is
set on :class:`CSRStore` at the end of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._categories import categorize
from ._counts import CountChecker
from ._open import as_source
from ._source import ArraySource, Source
from ._atomic import WriteJob, check_destination, replace_into
from ._checksum import crc32c
from ._store import CSRStore, StoreSource, is_store
from ._store_checks import _file_crc, manifest_crc
from ._store_format import _CHUNK_CRC, _CRC_BLOCK, CHUNK_ROWS, FORMAT, FORMAT_VERSION


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
    """An append-only binary array file with an incremental CRC-32 and in-place upcasting.

    With ``chunk_ends`` (element offsets where chunks end, a list the writer extends before the
    elements reach them) it also records the CRC-32C of each chunk.
    """

    def __init__(self, path: Path, dtype, chunk_ends: list[int] | None = None):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.n = 0
        self.crc = 0
        self.chunk_ends = chunk_ends
        self.chunk_crcs: list[int] = []
        self._chunk_crc = 0
        self._f = open(path, "wb")

    def append(self, arr: np.ndarray) -> None:
        buf = np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1)
        self._f.write(memoryview(buf).cast("B"))
        self.crc = zlib.crc32(memoryview(buf).cast("B"), self.crc)
        if self.chunk_ends is not None:
            self._feed_chunks(buf)
        self.n += buf.size

    def _feed_chunks(self, buf: np.ndarray) -> None:
        """Extend the current chunk's CRC-32C by ``buf``, closing every chunk that ends in it."""
        ends, done = self.chunk_ends, self.chunk_crcs
        pos = self.n
        stop = pos + buf.size
        while len(done) < len(ends) and ends[len(done)] <= stop:
            end = ends[len(done)]
            self._chunk_crc = crc32c(buf[pos - self.n : end - self.n], self._chunk_crc)
            done.append(self._chunk_crc)
            self._chunk_crc = 0
            pos = end
        if pos < stop:
            self._chunk_crc = crc32c(buf[pos - self.n :], self._chunk_crc)

    def finish_chunks(self) -> None:
        """Close the chunks that end where the file ends (after the last ``chunk_ends``)."""
        self._feed_chunks(np.empty(0, dtype=self.dtype))

    def upcast(self, dtype) -> None:
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return
        self._f.close()
        old = self.path.with_suffix(".old")
        os.replace(self.path, old)
        prev, self.dtype, self.n, self.crc = self.dtype, dtype, 0, 0
        self.chunk_crcs, self._chunk_crc = [], 0  # the bytes change: recomputed on re-append
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


def _write_array(path: Path, values) -> dict:
    f = _ArrayFile(path, np.uint32)
    f.append(np.asarray(values, dtype=np.uint32))
    return f.close()


def _file_entry(path: Path) -> dict:
    with open(path, "rb") as fh:
        fh.flush()
        os.fsync(fh.fileno())
    return {"crc32": _file_crc(path)}


class StoreWriter:
    """Writes a store from CSR row chunks, in bounded memory, atomically.

    Use as a context manager; on an exception the temporary directory is removed and nothing
    appears at ``path``. Codes and categories are recorded as given: code obs columns with
    :func:`categorize` (as :meth:`CSRStore.create` does). With ``overwrite`` an existing
    ``path`` is replaced only if it is a store (:func:`is_store`), and only once the new one is
    complete. Temporary folders of conversions to ``path`` that were killed are removed first
    (see ``_atomic``).
    """

    def __init__(self, path, n_genes: int, var_names, batch_key=None, batch_categories=None,
                 labels_key=None, labels_categories=None, check: bool = True,
                 overwrite: bool = False, with_obs_names: bool = True, extra: dict | None = None,
                 chunk_rows: int = CHUNK_ROWS, _job: WriteJob | None = None):
        self.path = Path(path)
        check_destination(self.path, overwrite, is_store, "CSR store")
        self.overwrite = overwrite
        self.n_genes = int(n_genes)
        self.var_names = [str(v) for v in var_names]
        if len(self.var_names) != self.n_genes:
            raise ValueError(f"{len(self.var_names)} gene names for {self.n_genes} genes")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive; got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)
        self._own_job = _job is None
        self.job = WriteJob(self.path) if _job is None else _job
        self.tmp = self.job.entry("tmp")
        self.tmp.mkdir()
        self.meta = {"batch_key": batch_key, "batch_categories": batch_categories,
                     "labels_key": labels_key, "labels_categories": labels_categories,
                     **(extra or {})}
        self.checker = CountChecker(what="the counts") if check else None
        self.n_cells = 0
        self.nnz = 0
        self._chunk_ends: list[int] = []
        self.files = {
            "indptr": _ArrayFile(self.tmp / "indptr.bin", np.int64),
            "indices": _ArrayFile(self.tmp / "indices.bin", smallest_uint(max(self.n_genes - 1, 0)),
                                  chunk_ends=self._chunk_ends),
            "data": _ArrayFile(self.tmp / "data.bin", np.uint8, chunk_ends=self._chunk_ends),
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
        indptr = chunk.indptr.astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        indices = chunk.indices[lo:hi]
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.n_genes):
            raise ValueError(f"gene indices outside [0, {self.n_genes}) in cells "
                             f"{self.n_cells}-{self.n_cells + n - 1}: the CSR input is invalid")
        codes = [self._codes(c, n, what, cats) for c, what, cats in (
            (batch_codes, "batch", self.meta["batch_categories"]),
            (labels_codes, "labels", self.meta["labels_categories"]))]
        need = _wider(f["data"].dtype, _data_dtype_for(data))
        f["data"].upcast(need)
        r = self.chunk_rows
        # chunks that end in these cells: their last element is known before it is written
        ends = np.arange((self.n_cells // r + 1) * r, self.n_cells + n + 1, r) - self.n_cells
        self._chunk_ends.extend((indptr[ends] - lo + self.nnz).tolist())
        f["indptr"].append(indptr[1:] - lo + self.nnz)
        f["indices"].append(indices)
        f["data"].append(data[lo:hi])
        f["batch"].append(codes[0])
        f["labels"].append(codes[1])
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

    def _codes(self, codes, n: int, what: str, categories) -> np.ndarray:
        if codes is None:
            return np.zeros(n, np.int32)
        codes = np.asarray(codes)
        hi = None if categories is None else len(categories)
        if codes.size and (int(codes.min()) < 0 or (hi is not None and int(codes.max()) >= hi)):
            raise ValueError(f"{what} codes of cells {self.n_cells}-{self.n_cells + n - 1} lie "
                             f"outside [0, {hi if hi is not None else 'inf'})")
        return codes

    def close(self) -> CSRStore:
        """Validate, write the manifest and move the store into place."""
        if self.checker is not None:
            self.checker.finish()
        if self.n_cells % self.chunk_rows:
            self._chunk_ends.append(self.nnz)
        for name in _CHUNK_CRC:
            self.files[name].finish_chunks()
        n_chunks = -(-self.n_cells // self.chunk_rows)
        assert all(len(self.files[k].chunk_crcs) == n_chunks for k in _CHUNK_CRC)
        arrays = {k: v.close() for k, v in self.files.items()}
        for name, crc_name in _CHUNK_CRC.items():
            arrays[crc_name] = _write_array(self.tmp / f"{crc_name}.bin",
                                            self.files[name].chunk_crcs)
        if self._source_rows is not None:
            arrays["source_rows"] = self._source_rows.close()
        files = {}
        if self._obs is not None:
            self._obs.close()
            files["obs_names.txt"] = _file_entry(self.tmp / "obs_names.txt")
        with open(self.tmp / "var_names.json", "w", encoding="utf-8") as fh:
            json.dump(self.var_names, fh)
        files["var_names.json"] = _file_entry(self.tmp / "var_names.json")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "nnz": self.nnz,
            "arrays": arrays,
            "files": files,
            "chunk_rows": self.chunk_rows,
            "chunk_checksum": "crc32c",
            "has_obs_names": self._obs is not None,
            **self.meta,
        }
        manifest["manifest_crc32"] = manifest_crc(manifest)
        with open(self.tmp / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            replace_into(self.tmp, self.path, self.job, self.overwrite, is_store, "CSR store")
        finally:
            if self._own_job:
                self.job.close()
        return CSRStore.open(self.path)

    def abort(self) -> None:
        for v in self.files.values():
            if not v._f.closed:
                v._f.close()
        if self._source_rows is not None and not self._source_rows._f.closed:
            self._source_rows._f.close()
        if self._obs is not None and not self._obs.closed:
            self._obs.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._own_job:
            self.job.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def create_store(path, source, batch_key: str | None = None, labels_key: str | None = None,
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
        obs columns stored as covariate codes with their categories, coded by
        :func:`categorize` (categories no cell uses are dropped, as for an AnnData given to
        the model; missing values are an error).
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
        Replace an existing store at ``path`` (only once the new one is complete). Only a
        store is ever replaced: any other file or folder at ``path`` is an error and is left
        as it is.

    Returns
    -------
    CSRStore
        The opened store.
    """
    path = Path(path)
    check_destination(path, overwrite, is_store, "CSR store")  # before reading any input
    src = as_source(source, layer=layer, batch_key=batch_key, labels_key=labels_key)
    cols = _gene_positions(src, genes)
    with WriteJob(path) as job:
        if shuffle and not isinstance(src, ArraySource):
            # random row access on HDF5/SOMA is slow: stage an unshuffled store (a temporary
            # entry of this conversion), shuffle from it
            staged = _write(job.entry("stage"), src, cols, batch_key, labels_key, False,
                            chunk_size, seed, check, False, job)
            src, cols, check = staged.source, None, False
        return _write(path, src, cols, batch_key, labels_key, shuffle, chunk_size, seed, check,
                      overwrite, job)


def _write(path: Path, src: Source, cols, batch_key, labels_key, shuffle: bool,
           chunk_size: int, seed: int, check: bool, overwrite: bool, job: WriteJob) -> CSRStore:
    var_names = src.var_names if cols is None else src.var_names[cols]
    if isinstance(src, StoreSource):
        batch_key = batch_key or src.store.batch_key
        labels_key = labels_key or src.store.labels_key
    bcodes, bcat = _recorded(src.batch_codes, src.batch_categories, batch_key or "batch")
    lcodes, lcat = _recorded(src.labels_codes, src.labels_categories, labels_key or "labels")
    obs_names = src.obs_names
    writer = StoreWriter(path, len(var_names), var_names, batch_key=batch_key,
                         batch_categories=bcat, labels_key=labels_key,
                         labels_categories=lcat, check=check, overwrite=overwrite,
                         with_obs_names=obs_names is not None, _job=job)
    with writer:
        if shuffle:
            order = np.random.default_rng(seed).permutation(src.n_cells)
            for a in range(0, src.n_cells, chunk_size):
                rows = order[a : a + chunk_size]
                chunk = src.get_rows(rows)
                src.release()
                writer.add(_subset_cols(chunk, cols), bcodes[rows], lcodes[rows],
                           None if obs_names is None else obs_names[rows], source_rows=rows)
        else:
            for start, chunk in src.iter_chunks(chunk_size):
                stop = start + chunk.shape[0]
                writer.add(_subset_cols(chunk, cols), bcodes[start:stop], lcodes[start:stop],
                           None if obs_names is None else obs_names[start:stop])
        if writer.n_cells != src.n_cells:
            raise ValueError(f"source yielded {writer.n_cells} cells, expected {src.n_cells}")
        return writer.close()


def _recorded(codes: np.ndarray, categories, key: str):
    """Codes and categories as a store records them: unused categories dropped.

    A source read with a key (AnnData, ``.h5ad``, SOMA) is coded already; this matters for a
    source that brings its own categories, e.g. a store written before unused categories were
    dropped. Bare integer codes (no categories) are kept as given.
    """
    if categories is None:
        return codes, None
    return categorize(pd.Categorical.from_codes(codes, categories), key)


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


CSRStore.create = staticmethod(create_store)
