"""Checking a CSR store's counts chunk by chunk as they are first read (see ``_store``)."""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings
import json
import zlib
from pathlib import Path

import numpy as np

from ._checksum import crc32c
from ._store_format import _CHUNK_CRC, _CRC_BLOCK, FORMAT, FORMAT_VERSION, StoreCorruptError, _recreate

#: elements checked per run of chunks before the mapped pages are dropped
_CHECK_READ = 1 << 22


def manifest_crc(manifest: dict) -> int:
    """CRC-32 of a manifest's canonical JSON, leaving out its own ``manifest_crc32`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


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


def read_manifest(path: Path, verify: bool = False) -> dict:
    """The manifest of the store at ``path``, checked: its own checksum, format and version,
    array shapes, every file present inside the folder with its size, and the CRC-32 of the
    per-cell files (all files with ``verify`` for a store without chunk checksums).

    Raises
    ------
    FileNotFoundError
        No folder at ``path``.
    StoreCorruptError
        Anything else missing, damaged or edited (the message says how to re-create the store).
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
    return manifest


class ChunkChecker:
    """Which chunks of a store's ``indices.bin`` / ``data.bin`` this process has checked, and
    the check itself: CRC-32C per chunk (or, for a store written before chunk checksums, gene
    indices below ``n_genes``), each chunk once, before any of its rows is used.

    Parameters
    ----------
    store
        The opened :class:`~scvi_fast.data.CSRStore` (its maps, row pointers and manifest).
    crc
        ``{"indices": per-chunk CRC-32C array, "data": ...}``, or None for an older store.
    rows_per_chunk
        Cells per chunk.
    enabled
        False: nothing is checked as it is read (to measure what the checks cost).
    """

    def __init__(self, store, crc: dict | None, rows_per_chunk: int, enabled: bool = True):
        self.store = store
        self.crc = crc
        self.rows_per_chunk = int(rows_per_chunk)
        n_chunks = math.ceil(store.n_cells / self.rows_per_chunk)
        self.checked = np.zeros(n_chunks, dtype=bool)
        self.n_unchecked = n_chunks if enabled else 0
        self._lock = threading.Lock()

    def check_rows(self, rows) -> None:
        """Check every chunk holding ``rows`` that this store has not checked yet.

        Costs nothing once every chunk has been checked.

        Raises
        ------
        StoreCorruptError
            Naming the file, the chunk and its cells, if a chunk's bytes fail their CRC-32C
            or hold a gene index of ``n_genes`` or more.
        """
        if not self.n_unchecked:
            return
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        chunks = np.unique(rows // self.rows_per_chunk)
        todo = chunks[~self.checked[chunks]]
        if todo.size:
            self.check_chunks(todo)

    def _chunk_rows_range(self, c: int) -> tuple[int, int]:
        r = self.rows_per_chunk
        return c * r, min((c + 1) * r, self.store.n_cells)

    def check_chunks(self, todo: np.ndarray, force: bool = False) -> None:
        """Check chunks ``todo`` (sorted ids), in runs of consecutive chunks."""
        with self._lock:
            if not force:
                todo = todo[~self.checked[todo]]
            if not todo.size:
                return
            ip, r = self.store.indptr, self.rows_per_chunk
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
                    newly = int(np.count_nonzero(~self.checked[c:c1]))
                    self.checked[c:c1] = True
                    self.n_unchecked = max(0, self.n_unchecked - newly)
                    c = c1

    def _check_run(self, c0: int, c1: int) -> None:
        """Check consecutive chunks ``c0:c1`` of indices and data."""
        ip = self.store.indptr
        base = int(ip[c0 * self.rows_per_chunk])
        end = int(ip[min(c1 * self.rows_per_chunk, self.store.n_cells)])
        for name in ("indices", "data"):
            # checksummed straight from the memory map (about twice as fast as reading a
            # copy), whose pages are dropped again at once
            span = (self.store.indices if name == "indices" else self.store.data)[base:end]
            try:
                self._check_span(name, span, base, c0, c1)
            finally:
                self._drop_pages(name, base * span.itemsize, end * span.itemsize)

    def _drop_pages(self, name: str, start: int, stop: int) -> None:
        """Unmap bytes ``start:stop`` of a mapped file from this process (page cache kept)."""
        mm = self.store._maps.get(name)
        if mm is None or stop <= start:
            return
        lo = start - start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, min(stop, len(mm)) - lo)
        except (AttributeError, OSError, ValueError):
            pass

    def _check_span(self, name: str, span: np.ndarray, base: int, c0: int, c1: int) -> None:
        """Chunks ``c0:c1`` of one file (``span`` starts at element ``base``)."""
        ip, r = self.store.indptr, self.rows_per_chunk
        fname = self.store.path / self.store.manifest["arrays"][name]["file"]
        if self.crc is not None:
            expect = self.crc[name]
            for c in range(c0, c1):
                a, b = self._chunk_rows_range(c)
                s, e = int(ip[a]) - base, int(ip[b]) - base
                if crc32c(span[s:e]) != int(expect[c]):
                    raise StoreCorruptError(
                        f"{fname}: chunk {c} (cells {a}-{b - 1}, bytes "
                        f"{(s + base) * span.itemsize}-{(e + base) * span.itemsize - 1}) fails "
                        f"its CRC-32C checksum: the file is damaged. {_recreate(self.store.path)}")
        elif name == "indices" and span.size and int(span.max()) >= self.store.n_genes:
            # without checksums (an older store) at least the gene indices are checked; with
            # them, the writer checked the indices and the checksum that they are as written
            bad = int(np.argmax(span >= self.store.n_genes))
            cell = int(np.searchsorted(ip, bad + base, "right")) - 1
            a, b = self._chunk_rows_range(cell // r)
            raise StoreCorruptError(
                f"{fname}: gene index {int(span[bad])} of cell {cell} (chunk {cell // r}, "
                f"cells {a}-{b - 1}) is not below n_genes={self.store.n_genes}: the file is "
                f"damaged. {_recreate(self.store.path)}")

    def _check_sizes(self) -> None:
        """Refuse to read mapped counts from files truncated since the store was opened (a
        read past their end would kill the process)."""
        for name in ("indices", "data"):
            spec = self.store.manifest["arrays"][name]
            try:
                size = os.stat(self.store.path / spec["file"]).st_size
            except FileNotFoundError:
                size = -1
            if size < spec["nbytes"]:
                raise StoreCorruptError(
                    f"{self.store.path / spec['file']} is shorter than when the store was opened "
                    f"({size} of {spec['nbytes']} bytes): the store was truncated or removed "
                    f"while in use. {_recreate(self.store.path)}")
