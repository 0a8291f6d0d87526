"""Block-shuffling CSR minibatch loader.

Three parts, each replaceable on its own:

* :class:`BlockShuffleSampler` decides *which rows*, per epoch and rank: contiguous blocks of
  ``block_size`` rows in a seeded random order, cut into buffers of ``buffer_size`` rows whose
  rows are permuted before being split into minibatches;
* :class:`BufferFetcher` decides *how they are read*: a buffer's blocks are staged into a
  preallocated buffer in the source's compact dtypes (the store: one ``pread`` per block;
  HDF5: one read per block; in-memory CSR needs no staging), then gathered in shuffled order
  into minibatch arrays (``int32`` indices, ``float32`` counts, row sums) by a numba
  ``prange`` pass;
* :class:`CSRLoader` ties them together; with ``prefetch`` a reader thread stages the next
  buffer while an emitter thread gathers the current one's minibatches.

Host memory is bounded by the staging buffers and a few output buffers, whatever the number of
non-zeros; per-cell metadata (row pointers, covariate codes) costs 24 bytes per cell.
"""

from __future__ import annotations

import mmap
import queue
import sys
import threading

import numpy as np

from ._csr import gather_rows, row_offsets
from ._minibatch import COVARIATE_FIELDS, CSRMinibatch
from ._open import as_source
from ._sampler import BlockShuffleSampler
from ._source import Source


def _alloc(n: int, dtype) -> np.ndarray:
    """An uninitialised array; large ones are backed by transparent huge pages where the
    kernel offers them, since first-touch page faults dominate the cost of a fresh buffer."""
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    if nbytes < (8 << 20):
        return np.empty(n, dtype=dtype)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
        pass
    return np.frombuffer(mm, dtype=dtype, count=n)


def _alloc_pinned(n: int, dtype) -> np.ndarray:
    """An uninitialised array in page-locked (pinned) host memory, from which CUDA copies run
    asynchronously; the numpy array keeps the torch tensor that owns the memory alive."""
    import torch

    t = torch.empty(n, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, pin_memory=True)
    return t.numpy()


class _OutBuffer:
    """Reusable output arrays of one minibatch; reused only when nothing still views them."""

    def __init__(self, n_rows: int, nnz: int, pin_memory: bool = False):
        alloc = _alloc_pinned if pin_memory else _alloc
        self.indptr = np.empty(n_rows + 1, dtype=np.int64)
        self.indices = alloc(nnz, np.int32)
        self.values = alloc(nnz, np.float32)
        self.library = np.empty(n_rows, dtype=np.float32)

    def fits(self, n_rows: int, nnz: int) -> bool:
        return self.indptr.shape[0] > n_rows and self.indices.shape[0] >= nnz

    def in_use(self) -> bool:
        # each array is referenced by this object and by getrefcount's argument; any more
        # means a minibatch (or a tensor made from one) still views it
        return (sys.getrefcount(self.indptr) > 2 or sys.getrefcount(self.indices) > 2
                or sys.getrefcount(self.values) > 2 or sys.getrefcount(self.library) > 2)


class _Slot:
    """One staging buffer: a buffer's rows in the source's compact dtypes."""

    def __init__(self, source: Source):
        self.indptr = np.empty(0, dtype=np.int64)
        self.indices = np.empty(0, dtype=source.indices_dtype)
        self.data = np.empty(0, dtype=source.data_dtype)


class BufferFetcher:
    """Reads a buffer of rows and emits its shuffled minibatches (see the module docstring).

    :meth:`stage` copies the buffer's rows (whole blocks, in file order) into a preallocated
    staging slot in the source's own compact dtypes (the store: one ``pread`` per block, so no
    mapped page counts towards RSS; HDF5: one read per block). :meth:`emit` then gathers
    ``emit_batches`` minibatches at a time, in shuffled order, with one numba ``prange`` pass
    into reusable output arrays. In-memory CSR sources skip staging and are gathered straight
    from their arrays.

    Host memory: ``n_slots`` staging buffers (``buffer_size`` cells in compact dtypes each)
    plus a few output groups; output arrays are recycled once no minibatch or tensor views
    them.
    """

    def __init__(self, source: Source, batch_size: int, stage: bool | None = None,
                 emit_batches: int = 4, max_pool: int = 6, n_slots: int = 2,
                 pin_memory: bool = False):
        if not source.supports_random_access:
            raise TypeError(
                f"{type(source).__name__} cannot be read by row; convert it to a store first: "
                "scvi_fast.data.CSRStore.create(path, source)"
            )
        self.source = source
        self.batch_size = batch_size
        self.emit_batches = max(1, int(emit_batches))
        self.stage_rows = not source.direct_gather if stage is None else stage
        self.slots = [_Slot(source) for _ in range(n_slots)]
        self._pool: list[_OutBuffer] = []
        self._max_pool = max_pool
        self._pool_lock = threading.Lock()
        self.pin_memory = pin_memory

    def stage(self, rows: np.ndarray, perm: np.ndarray, slot: int = 0):
        """Read buffer ``rows`` into staging slot ``slot``.

        Returns ``(src, take, obs)``: the CSR arrays to gather from, the rows of ``src`` in
        emission order, and the matching source rows.
        """
        obs = rows[perm]
        if not self.stage_rows:
            # gathered straight from the source's arrays: a store checks the chunks first
            # (staged rows are checked by read_rows)
            self.source.check_rows(rows)
            return (self.source.indptr, self.source.indices, self.source.data), obs, obs
        sl = self.slots[slot]
        n = rows.size
        if sl.indptr.shape[0] < n + 1:
            sl.indptr = np.empty(n + 1, dtype=np.int64)
        indptr = sl.indptr[: n + 1]
        _, nnz = row_offsets(self.source.indptr, rows, indptr)
        if sl.indices.shape[0] < nnz:
            cap = int(nnz * 1.25) + 1
            sl.indices = _alloc(cap, self.source.indices_dtype)
            sl.data = _alloc(cap, self.source.data_dtype)
        indices, data = sl.indices[:nnz], sl.data[:nnz]
        self.source.read_rows(rows, indptr, indices, data)
        self.source.release()
        return (indptr, indices, data), perm, obs

    def _out_buffer(self, n_rows: int, nnz: int) -> _OutBuffer:
        with self._pool_lock:
            free = None
            for i, buf in enumerate(self._pool):
                if not buf.in_use():
                    if buf.fits(n_rows, nnz):
                        return buf
                    free = i
            buf = _OutBuffer(max(n_rows, self.batch_size * self.emit_batches),
                             int(nnz * 1.25) + 1, pin_memory=self.pin_memory)
            if free is not None:
                self._pool[free] = buf
            elif len(self._pool) < self._max_pool:
                self._pool.append(buf)
            return buf

    def _emit_group(self, src, take: np.ndarray, obs: np.ndarray) -> list[CSRMinibatch]:
        """Gather rows ``take`` of ``src`` (one parallel launch) and cut them into batches."""
        n = take.size
        offsets, nnz = row_offsets(src[0], take)
        buf = self._out_buffer(n, nnz)
        indptr = buf.indptr[: n + 1]
        library = buf.library[:n]
        indptr[:] = offsets
        gather_rows(*src, take, out=(indptr, buf.indices, buf.values), out_sum=library,
                    offsets_ready=True)
        batch = self.source.batch_codes[obs]
        labels = self.source.labels_codes[obs]
        covs = {f: getattr(self.source, f) for f in COVARIATE_FIELDS}
        covs = {f: v[obs] for f, v in covs.items() if v is not None}
        out = []
        bs = self.batch_size
        for a in range(0, n, bs):
            b = min(a + bs, n)
            lo, hi = int(indptr[a]), int(indptr[b])
            out.append(CSRMinibatch(
                indptr=indptr[a : b + 1] - lo,
                indices=buf.indices[lo:hi],
                values=buf.values[lo:hi],
                batch=batch[a:b],
                labels=labels[a:b],
                library=library[a:b],
                obs_idx=obs[a:b],
                n_genes=self.source.n_genes,
                **{f: v[a:b] for f, v in covs.items()},
            ))
        return out

    def emit(self, staged):
        """Yield lists of minibatches (one list per parallel gather) from a staged buffer."""
        src, take, obs = staged
        step = self.batch_size * self.emit_batches
        for a in range(0, take.size, step):
            yield self._emit_group(src, take[a : a + step], obs[a : a + step])
        if not self.stage_rows:
            self.source.release()

    def iter_batches(self, rows: np.ndarray, perm: np.ndarray, slot: int = 0):
        """Read buffer ``rows``; yield its minibatches with rows in ``perm`` order."""
        for group in self.emit(self.stage(rows, perm, slot)):
            yield from group


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _DONE


_DONE = object()


#: rows per shuffled block when a source is read from disk (see ``CSRLoader(block_size=...)``)
DISK_BLOCK_SIZE = 32


class CSRLoader:
    """Iterate CSR minibatches over a source, shuffled by blocks, prefetched on a thread.

    Parameters
    ----------
    source
        Anything :func:`as_source` accepts: an AnnData (in memory or backed), a path to an
        ``.h5ad`` / 10x file / store, a :class:`CSRStore`, a :class:`Source`.
    batch_size
        Cells per minibatch.
    shuffle
        Block-shuffle rows (``False``: rows in ``indices`` order, for inference).
    seed
        Seed of the shuffle; epoch ``e`` uses ``seed + e`` (see :meth:`set_epoch`).
    indices
        Restrict to these source rows (e.g. a train or validation split).
    drop_last
        Drop the last incomplete minibatch.
    rank, world_size
        Shard each epoch across distributed ranks (e.g. ``torch.distributed.get_rank()`` and
        ``get_world_size()``): every rank gets a disjoint share of the same shuffled epoch and
        the same number of minibatches (see :class:`BlockShuffleSampler`).
    block_size
        Contiguous rows read together; larger is faster to read, smaller mixes better.
        Default: 1 for sources gathered straight from memory (in-memory matrices: every epoch
        is a full permutation of the rows, as scvi-tools' ``RandomSampler``, at no cost),
        :data:`DISK_BLOCK_SIZE` for sources read from disk (stores, HDF5 files), where
        contiguous reads are what makes shuffled training fast.
    buffer_size
        Rows shuffled together; host memory grows with it.
    prefetch
        Read ahead on a background thread while the current minibatch is consumed.
    emit_batches
        Minibatches gathered per parallel launch (and handed over together); host memory for
        output grows with it.
    stage
        Copy each buffer's blocks into a staging buffer before the shuffled gather (default:
        for stores and HDF5 files, not for in-memory matrices). ``False`` on a store gathers
        straight from the memory map: one copy fewer, but the mapped page-cache pages count
        towards the process's RSS while a buffer is read.
    pin_memory
        Gather the minibatches' entries into page-locked host memory, so that copies to a
        CUDA device run asynchronously (needs a CUDA build of torch; used by training on a GPU).
    num_threads
        numba threads for the gather on the background thread (default: all cores but one
        when a reader thread stages rows, else numba's setting). On machines whose cores are
        busy with other processes, 1 can be faster.
    layer, batch_codes, labels_codes, batch_key, labels_key
        Passed to :func:`as_source`.

    Examples
    --------
    >>> loader = CSRLoader("census_hvg.store", batch_size=1024, seed=0)
    >>> for epoch in range(n_epochs):
    ...     loader.set_epoch(epoch)
    ...     for mb in loader:
    ...         t = mb.to("cuda")
    """

    def __init__(self, source, batch_size: int = 1024, shuffle: bool = True, seed: int = 0,
                 indices=None, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 block_size: int | None = None, buffer_size: int = 16384, prefetch: bool = True,
                 emit_batches: int = 4, stage: bool | None = None, pin_memory: bool = False,
                 num_threads: int | None = None, layer: str | None = None, batch_codes=None, labels_codes=None,
                 batch_key: str | None = None, labels_key: str | None = None):
        self.source = as_source(source, layer=layer, batch_codes=batch_codes,
                                labels_codes=labels_codes, batch_key=batch_key,
                                labels_key=labels_key)
        if block_size is None:
            block_size = 1 if self.source.direct_gather else DISK_BLOCK_SIZE
        self.sampler = BlockShuffleSampler(
            self.source.n_cells, batch_size=batch_size, indices=indices, shuffle=shuffle,
            seed=seed, block_size=block_size, buffer_size=buffer_size, drop_last=drop_last,
            rank=rank, world_size=world_size,
        )
        self.fetcher = BufferFetcher(self.source, self.sampler.batch_size,
                                     emit_batches=emit_batches, stage=stage,
                                     pin_memory=pin_memory)
        self.prefetch = prefetch
        self.num_threads = num_threads

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def n_genes(self) -> int:
        return self.source.n_genes

    @property
    def var_names(self) -> np.ndarray:
        return self.source.var_names

    @property
    def n_cells(self) -> int:
        """Cells this rank iterates per epoch (including wrap-around padding)."""
        s = self.sampler
        return min(s.n_rank_rows, len(s) * s.batch_size)

    @property
    def indices(self) -> np.ndarray:
        s = self.sampler
        return np.arange(s.n, dtype=np.int64) if s.indices is None else s.indices

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of epoch ``epoch`` (``seed + epoch``) for the next iteration."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        if not self.prefetch:
            for rows, perm in self.sampler.buffers():
                yield from self.fetcher.iter_batches(rows, perm)
            return
        # Two background threads form a pipeline: the reader stages buffer k + 1 (I/O, mostly
        # outside the GIL) while the emitter gathers buffer k's minibatches (numba, no GIL).
        # Staging slots go back to the reader once the emitter is done with them.
        fetcher = self.fetcher
        stop = threading.Event()
        free_slots: queue.Queue = queue.Queue()
        for i in range(len(fetcher.slots)):
            free_slots.put(i)
        staged_q: queue.Queue = queue.Queue(maxsize=1)
        out_q: queue.Queue = queue.Queue(maxsize=1)
        n_threads = self.num_threads
        if n_threads is None and fetcher.stage_rows:
            import numba

            # leave a core to the reader thread; OpenMP workers that share a core with it
            # spin-wait at every launch
            n_threads = max(1, numba.config.NUMBA_NUM_THREADS - 1)

        def reader():
            try:
                for rows, perm in self.sampler.buffers():
                    slot = _get(free_slots, stop)
                    if slot is _DONE:
                        return
                    staged = fetcher.stage(rows, perm, slot)
                    if not _put(staged_q, (slot, staged), stop):
                        return
                _put(staged_q, _DONE, stop)
            except BaseException as err:  # handed to the consumer
                _put(out_q, err, stop)

        def emitter():
            try:
                if n_threads is not None:
                    import numba

                    numba.set_num_threads(n_threads)  # this thread only
                while True:
                    item = _get(staged_q, stop)
                    if item is _DONE:
                        break
                    slot, staged = item
                    for group in fetcher.emit(staged):
                        if not _put(out_q, group, stop):
                            return
                    del staged, group
                    free_slots.put(slot)
                _put(out_q, _DONE, stop)
            except BaseException as err:
                _put(out_q, err, stop)

        threads = [threading.Thread(target=f, name=f"scvi_fast-{f.__name__}", daemon=True)
                   for f in (reader, emitter)]
        for t in threads:
            t.start()
        try:
            while True:
                item = out_q.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield from item
                del item
        finally:
            stop.set()
            for t in threads:
                t.join()

    def __repr__(self) -> str:
        return (f"CSRLoader({self.source!r}, batch_size={self.batch_size}, "
                f"n_batches={len(self)}, shuffle={self.sampler.shuffle})")
