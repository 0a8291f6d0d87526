"""Which rows a rank reads, per epoch: the sharding rule and the block-shuffling sampler.

:func:`shard_range` is the one rule that splits rows between the ranks of a distributed job
(training, validation and inference); :class:`BlockShuffleSampler` orders an epoch's rows in
shuffled contiguous blocks and hands each rank its share (see :mod:`._loader` for how the rows
are read).
"""

from __future__ import annotations

import math

import numpy as np


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that ``rank`` of ``world_size`` gets: the one sharding rule.

    Contiguous, in rank order, sizes differing by at most one (the first ``n % world_size``
    ranks get one more), as ``np.array_split``. Used for training (each rank's share of the
    shuffled epoch, see :class:`BlockShuffleSampler`), for the validation split and for
    inference.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    base, extra = divmod(int(n), int(world_size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class BlockShuffleSampler:
    """Which rows go into which buffer and minibatch, per epoch and rank.

    The epoch's stream is the rows in shuffled blocks of ``block_size`` contiguous rows, cut
    into buffers of ``buffer_size`` rows whose rows are permuted. With ``block_size=1``, or
    when one buffer holds every row, the epoch's order is a uniformly random permutation of
    the rows (what scvi-tools' ``RandomSampler`` draws); otherwise rows of one block always
    share a buffer, and each minibatch is a random sample of its buffer (a small departure
    from a full permutation that makes reads from disk contiguous).

    Parameters
    ----------
    n_rows
        Number of source rows (used when ``indices`` is None).
    batch_size
        Cells per minibatch.
    indices
        Source rows to draw from. With ``shuffle`` they are sorted first, so that blocks are
        contiguous runs of rows; without, rows come in this order.
    shuffle
        Shuffle blocks and rows within buffers; otherwise rows come in ``indices`` order.
    seed
        The epoch's order is drawn from ``np.random.default_rng(seed + epoch)``.
    block_size
        Rows per contiguous block (1: a full permutation of the rows every epoch).
    buffer_size
        Rows per shuffle buffer (rounded up to a multiple of ``batch_size``).
    drop_last
        Drop each rank's last incomplete minibatch.
    rank, world_size
        Shard every epoch across ranks: the shuffled stream (identical on every rank) is cut by
        :func:`shard_range`, and every rank takes the same number of cells from the start of
        its share so that all take the same number of steps: ``ceil(n / world_size)``, reading
        on into the next share (wrapping around at the end) when its own is one short, or
        with ``drop_last`` ``n // world_size`` (disjoint shares, no repeats).
    """

    def __init__(self, n_rows: int, batch_size: int = 1024, indices=None, shuffle: bool = True,
                 seed: int = 0, block_size: int = 32, buffer_size: int = 16384,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or block_size < 1:
            raise ValueError("batch_size and block_size must be positive")
        shard_range(0, rank, world_size)  # checks the rank
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle and self.indices is not None:
            # the order of a shuffled subset is irrelevant; sorted, its blocks are contiguous
            # runs of rows on disk (a random train split would otherwise read row by row)
            self.indices = np.sort(self.indices)
        if self.indices is not None and self.indices.size and (
                self.indices.min() < 0 or self.indices.max() >= n_rows):
            raise IndexError(f"indices must lie in [0, {n_rows})")
        self.n = int(n_rows if self.indices is None else self.indices.size)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.block_size = int(block_size)
        self.buffer_size = int(math.ceil(max(buffer_size, batch_size) / batch_size) * batch_size)
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def n_rank_rows(self) -> int:
        """Cells this rank sees per epoch (before dropping an incomplete last batch)."""
        if self.world_size == 1:
            return self.n
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        m = self.n_rank_rows
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def _block_stream(self, rng):
        """Block order and cumulative lengths of the epoch's stream (none without shuffling;
        no lengths for blocks of one row: the order is then the epoch's permutation of the rows)."""
        if not self.shuffle:
            return None, None, None
        order = rng.permutation(math.ceil(self.n / self.block_size) if self.n else 0)
        if self.block_size == 1:
            return order, None, None
        lens = np.minimum(self.block_size, self.n - order * self.block_size)
        return order, np.cumsum(lens), lens

    def _positions(self, a: int, b: int, order, cum, lens) -> np.ndarray:
        """Positions (into ``indices``) of stream entries ``a..b``, wrapping past the end."""
        p = np.arange(a, b, dtype=np.int64) % self.n
        if not self.shuffle:
            return p
        if cum is None:
            return order[p]
        blk = np.searchsorted(cum, p, side="right")
        return order[blk] * self.block_size + (p - (cum[blk] - lens[blk]))

    def buffers(self):
        """Yield ``(rows, perm)`` per buffer: the rows to stage (in read order) and the
        permutation of staged positions that gives the emission order."""
        rng = np.random.default_rng(self.seed + self.epoch)
        order, cum, lens = self._block_stream(rng)
        lo, _ = shard_range(self.n, self.rank, self.world_size)
        n_take = len(self) * self.batch_size if self.drop_last else self.n_rank_rows
        for a in range(0, n_take, self.buffer_size):
            b = min(a + self.buffer_size, n_take)
            pos = self._positions(lo + a, lo + b, order, cum, lens)
            rows = pos if self.indices is None else self.indices[pos]
            if self.shuffle:
                rows = np.sort(rows)  # sequential reads; mixing comes from the permutation
                perm = rng.permutation(rows.size)
            else:
                perm = np.arange(rows.size, dtype=np.int64)
            yield rows, perm
