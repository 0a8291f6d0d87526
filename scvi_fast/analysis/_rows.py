"""Per-cell results written to ``.npy`` files, by one process or by the ranks of a job.

:class:`NpyFile` is the one ``.npy`` writer: the header first, then blocks of rows written at
their place with plain file writes (never memory-mapped, so the rows pass through the page
cache without counting towards the process's resident memory), under a temporary name renamed
into place once complete, so an interrupted run never leaves a partial file. :func:`map_rows`
runs a per-minibatch function over rows split across the ranks of a job by
:func:`scvi_fast.data.shard_range`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scvi_fast.data import shard_range

from ._checks import check_finite


class NpyFile:
    """A float32 ``(n_rows, n_cols)`` ``.npy`` file written block by block.

    ``create=True`` writes the header and sizes the file (done once, by one process); other
    processes open the same temporary file with ``create=False`` and write their own rows.
    :meth:`finish` renames it into place; :meth:`close` only closes (the other ranks);
    :meth:`discard` deletes it.
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, n_cols: int, create: bool = True):
        self.path = Path(path)
        if self.path.suffix != ".npy":
            raise ValueError(f"out must be a .npy file; got {self.path}")
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self.row_bytes = 4 * self.n_cols
        self.rows = 0  # rows written by this process
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.tmp, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False, "shape": (self.n_rows, self.n_cols)})
                fh.truncate(fh.tell() + self.n_rows * self.row_bytes)
        self.fh = open(self.tmp, "r+b")  # closed in finish, close or discard
        try:
            np.lib.format.read_magic(self.fh)
            np.lib.format.read_array_header_1_0(self.fh)
            self.offset = self.fh.tell()
        except BaseException:
            self.discard()
            raise

    def write(self, pos: int, block: np.ndarray) -> None:
        """Rows ``pos .. pos + len(block)`` of the file."""
        k = block.shape[0]
        if pos < 0 or pos + k > self.n_rows or block.shape[1:] != (self.n_cols,):
            raise RuntimeError(f"block of shape {block.shape} at row {pos} does not fit a "
                               f"({self.n_rows}, {self.n_cols}) file")
        self.fh.seek(self.offset + pos * self.row_bytes)
        self.fh.write(np.ascontiguousarray(block, dtype=np.float32).data)
        self.rows += k

    def close(self) -> None:
        self.fh.close()

    def finish(self) -> np.ndarray:
        """Rename the complete file into place; returns it as a read-only memory map."""
        self.fh.close()
        os.replace(self.tmp, self.path)
        return np.load(self.path, mmap_mode="r")

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def map_rows(fn: Callable, make_loader: Callable, rows: np.ndarray, n_cols: int,
             device: torch.device, ctx=None, out: str | os.PathLike | None = None) -> np.ndarray:
    """``fn`` over every row of ``rows``, split across ranks; one ``(len(rows), n_cols)`` array.

    Rank ``r`` handles the rows :func:`~scvi_fast.data.shard_range` gives it, iterating
    ``make_loader(rows[lo:hi])`` and calling ``fn(minibatch on device) -> (B, n_cols)``.
    ``ctx`` is the job's context (``rank``, ``world_size``, ``barrier()``,
    ``all_gather_object()``; :class:`scvi_fast.train.DistContext`), None outside a job.

    With ``out`` (a ``.npy`` path, on a filesystem every rank sees), rank 0 creates the
    :class:`NpyFile`, every rank writes its row range minibatch by minibatch, and rank 0
    renames it once all are done; the result is returned as a read-only memmap. Without
    ``out`` the ranks' blocks are gathered and every rank returns the whole array.
    Collective under a job: every rank must call it.
    """
    rank, ws = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    n = int(rows.shape[0])
    lo, hi = shard_range(n, rank, ws)

    def blocks():
        if hi > lo:
            for mb in make_loader(rows[lo:hi]):
                block = fn(mb.to(device, non_blocking=True)).float().cpu().numpy()
                check_finite(block, f"the output of rank {rank}'s cells")
                yield block

    def barrier():
        if ctx is not None:
            ctx.barrier()

    if out is None:
        mine = list(blocks())
        mine = np.concatenate(mine) if mine else np.zeros((0, n_cols), np.float32)
        return mine if ctx is None else np.concatenate(ctx.all_gather_object(mine))
    if rank == 0:
        NpyFile(out, n, n_cols).close()
    barrier()
    file = NpyFile(out, n, n_cols, create=False)
    try:
        pos = lo
        for b in blocks():
            file.write(pos, b)
            pos += b.shape[0]
        if pos != hi:
            raise RuntimeError(f"rank {rank} produced {pos - lo} rows for its range [{lo}, {hi})")
    finally:
        file.close()
    barrier()
    if rank == 0:
        file.finish()
    barrier()
    return np.load(out, mmap_mode="r")
