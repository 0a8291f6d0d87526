"""The embedding: the posterior of ``z`` for every cell, streamed through the encoder.

:func:`latent_representation` takes a module, an iterable of host minibatches
(:class:`~scvi_fast.data.CSRMinibatch` or :func:`in_order_batches`, in output order) and a device, and returns the
``(n_cells, n_latent)`` posterior means (or samples, or means and variances), or writes them to
a ``.npy`` file. Only the encoder runs, and only its mean head when the mean is asked for.

Three stages overlap, each on its own thread::

    loader threads       main thread                              writer thread
    gather batch i+1     H2D of batch i+1 on a side stream (CUDA)  wait for batch i-1's D2H
                         encode batch i on the compute stream,     copy its rows into the
                         D2H into a free output slot, event         result or append to the file

* Inputs (CUDA): each minibatch's CSR arrays are sent with asynchronous copies on a side
  stream, straight from the loader's pinned buffers (``CSRLoader(pin_memory=True)``), else
  from one of two pinned host slots that are reused from batch to batch (grown when a batch
  has more non-zeros); the compute stream waits on that copy's event only. A slot is refilled,
  and the loader arrays it holds let go, once its previous copy has finished (its event),
  which in practice is long done, so the host never waits for the GPU there. On the CPU the
  minibatch is used as is (no copy; ``int32`` gene indices are kept, every back-end reads
  them).
* Outputs: ``max_pending`` output slots (pinned on CUDA). The result of batch ``i`` is copied
  into a free slot asynchronously and handed to the writer thread with an event; the writer
  waits for that event (not for the whole device), writes the rows and frees the slot. There
  is no per-batch ``torch.cuda.synchronize``; the main thread waits only when every slot is
  still being written (the device is ``max_pending`` batches ahead of the writer).
* ``out=``: blocks go to an :class:`~scvi_fast.analysis._rows.NpyFile` (header first, rows
  written with plain file writes, never memory-mapped, so the process's resident memory does
  not grow with the number of cells; renamed into place once complete: an interrupted call
  leaves no partial ``out``). Host memory is bounded by the loader's buffers, two input slots and
  ``max_pending`` output slots, whatever the number of cells.

Each batch's encoder runs exactly as a plain loop would run it (the same kernels, in the same
order, on the same rows), so the result is bitwise that of ``module.posterior`` applied batch by
batch; sampling (``give_mean=False``) draws :func:`~scvi_fast.module.sample_z` per batch from the
global generator, as that loop would.

Not done: capturing the encoder as a CUDA graph. At the default CUDA batch of 16384 cells an
encoder call is about ten kernel launches against milliseconds of work per batch, so the
launch overhead a graph removes is of the order of 1%; a graph would also need padded static
inputs and a second code path.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch

from scvi_fast.module import sample_z

from ._checks import check_finite
from ._rows import NpyFile

#: the values of ``precision``: fp32, or bfloat16 autocast of the encoder's GEMMs (CUDA only)
PRECISIONS = ("32", "bf16-mixed")
#: cells per inference minibatch by default: large on a GPU (fewer, fuller launches); on the
#: CPU larger batches measured no faster (the sparse layer sweeps its weight per batch either way)
DEFAULT_BATCH_SIZE = {"cuda": 16384}
CPU_BATCH_SIZE = 1024
#: the minibatch fields the encoder reads (covariates are not encoded in scVI's default)
_CSR_FIELDS = ("indptr", "indices", "values")


class _RowSlice:
    """Rows ``a:b`` of an in-memory CSR matrix as views of its arrays (what the encoder reads)."""

    __slots__ = ("indptr", "indices", "values", "n_genes")

    def __init__(self, indptr, indices, values, n_genes):
        self.indptr, self.indices, self.values, self.n_genes = indptr, indices, values, n_genes

    @property
    def n_cells(self) -> int:
        return int(self.indptr.shape[0] - 1)


def in_order_batches(source, batch_size: int):
    """Minibatches of all rows of an in-memory CSR source, in order, as views; else None.

    Embedding every cell of a matrix held in memory reads its rows in order, so a minibatch is
    a slice of its arrays: no gather, no copy and no numba kernel to load on a first call
    (about 60 ms per process at 2 threads, the largest fixed cost of a small call). Only the
    dtypes the loader would emit (``int32`` gene indices, ``float32`` counts) are sliced, so
    the encoder sees exactly what a :class:`~scvi_fast.data.CSRLoader` would hand it; other
    sources (stores, HDF5 files, other dtypes) return None: use a loader.
    """
    from scvi_fast.data import ArraySource

    if not (isinstance(source, ArraySource) and isinstance(source.data, np.ndarray)
            and source.indices.dtype == np.int32 and source.data.dtype == np.float32):
        return None
    indptr = source.indptr

    def gen():
        for a in range(0, source.n_cells, batch_size):
            b = min(a + batch_size, source.n_cells)
            lo, hi = int(indptr[a]), int(indptr[b])
            yield _RowSlice(indptr[a : b + 1].astype(np.int64) - lo, source.indices[lo:hi],
                            source.data[lo:hi], source.n_genes)

    return gen()


def default_batch_size(device: torch.device | str) -> int:
    """Cells per inference minibatch on ``device`` when the caller gives none."""
    return DEFAULT_BATCH_SIZE.get(torch.device(device).type, CPU_BATCH_SIZE)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")


def latent_fn(
    module,
    give_mean: bool = True,
    return_dist: bool = False,
    precision: Literal["32", "bf16-mixed"] = "32",
    mc_samples: int = 5000,
) -> Callable:
    """The per-minibatch embedding: a device minibatch -> ``(B, Z)`` float32 tensor.

    ``give_mean``: the posterior mean (mean head only), else one sample
    (:func:`~scvi_fast.module.sample_z`, global generator). ``return_dist``: ``(B, 2Z)``,
    the mean and the variance side by side (of the normal, untransformed). For
    ``latent_distribution="ln"``, as scvi-tools: a sample is the softmax of a normal draw and
    the mean is the average softmax of ``mc_samples`` draws. ``precision="bf16-mixed"`` runs
    the encoder under bfloat16 autocast on CUDA (ignored on the CPU); the outputs stay float32.
    """
    _check_precision(precision)
    ln = getattr(module, "latent_distribution", "normal") == "ln"
    need_var = return_dist or not give_mean or ln

    def fn(x) -> torch.Tensor:
        dev = x.values.device
        ctx = (torch.autocast(dev.type, dtype=torch.bfloat16)
               if precision == "bf16-mixed" and dev.type == "cuda" else contextlib.nullcontext())
        with ctx:
            q_m, q_v = module.posterior(x, need_var=need_var)
        if return_dist:
            return torch.cat([q_m, q_v], dim=1)
        if ln and give_mean:
            return _mean_softmax(q_m, q_v, mc_samples)
        if give_mean:
            return q_m
        return module.z_transformation(sample_z(q_m, q_v)) if ln else sample_z(q_m, q_v)

    return fn


def _mean_softmax(q_m: torch.Tensor, q_v: torch.Tensor, mc_samples: int,
                  max_elements: int = 1 << 24) -> torch.Tensor:
    """``mean_s softmax(z_s)``, ``z_s ~ N(q_m, q_v)``: the logistic-normal mean scvi-tools
    reports, drawn in chunks of samples that bound the ``S x B x Z`` temporaries."""
    total = torch.zeros_like(q_m)
    per = max(1, max_elements // max(1, q_m.numel()))
    for s0 in range(0, mc_samples, per):
        n = min(per, mc_samples - s0)
        total += torch.softmax(sample_z(q_m, q_v, n), dim=-1).sum(0)
    return total / mc_samples


@torch.inference_mode()
def latent_representation(
    module,
    batches: Iterable,
    n_cells: int,
    device: torch.device | str = "cpu",
    *,
    give_mean: bool = True,
    return_dist: bool = False,
    out: str | os.PathLike | None = None,
    precision: Literal["32", "bf16-mixed"] = "32",
    progress_bar: bool = False,
    max_pending: int = 3,
    mc_samples: int = 5000,
):
    """Posterior mean (or a sample, or mean and variance) of ``z`` for every cell.

    Parameters
    ----------
    module
        A :class:`~scvi_fast.module.VAE` (anything with ``posterior(x, need_var)`` and
        ``n_latent``); moved to ``device`` and put in eval mode.
    batches
        Host minibatches in output order: :class:`~scvi_fast.data.CSRMinibatch` (e.g. from a
        ``CSRLoader(..., shuffle=False)``) or :func:`in_order_batches`; ``n_cells`` rows in
        all. Only ``indptr``, ``indices``, ``values`` and ``n_genes`` are read.
    n_cells
        Number of cells ``batches`` yields.
    device
        Where the encoder runs.
    give_mean, return_dist, precision, mc_samples
        See :func:`latent_fn`.
    out
        Path of a ``.npy`` file to stream the embedding into (float32, ``(n_cells, n_latent)``);
        not with ``return_dist``.
    progress_bar
        Show cells/s.
    max_pending
        Output blocks in flight between the device and the writer thread.

    Returns
    -------
    ``(n_cells, n_latent)`` float32 array; with ``return_dist`` the pair ``(mean, variance)``;
    with ``out`` the written file, opened read-only as a memory map.
    """
    if out is not None and return_dist:
        raise ValueError("return_dist=True cannot be combined with out=")
    device = torch.device(device)
    fn = latent_fn(module, give_mean=give_mean, return_dist=return_dist, precision=precision,
                   mc_samples=mc_samples)
    module.to(device).eval()
    n_latent = int(module.n_latent)
    n_cols = 2 * n_latent if return_dist else n_latent
    sink = (NpyFile(out, n_cells, n_cols) if out is not None
            else _Arrays(n_cells, n_latent, with_var=return_dist))
    try:
        n = _stream(fn, batches, device, sink, max_pending, progress_bar, n_cells)
        if n != n_cells:
            raise RuntimeError(f"the minibatches held {n} cells; {n_cells} were expected")
        return sink.finish()
    except BaseException:
        sink.discard()
        raise


def _stream(fn, batches, device, sink, max_pending, progress_bar, n_cells, copy_inputs=None) -> int:
    """Run ``fn`` over ``batches`` and hand every output block to ``sink``; returns the rows.

    ``copy_inputs`` forces (or skips) the pinned-slot copy of the inputs; it defaults to CUDA
    only (tests use it to run the slot logic on the CPU).
    """
    # streams, events and the encoder's launches all on the model's GPU, whichever is current
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        feed = _HostToDevice(device, copy=copy_inputs)
        writer = _Writer(sink, device, max_pending)
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_cells, desc="Embedding", unit="cells", unit_scale=True)
        it = iter(batches)
        pos = 0
        try:
            staged = feed.stage(next(it, None))
            while staged is not None:
                x = feed.take(staged)
                k = x.n_cells
                writer.put(pos, fn(x))
                del x, staged
                pos += k
                if bar is not None:
                    bar.update(k)
                # the device works on batch i while the loader hands over batch i + 1 and its
                # inputs are staged
                staged = feed.stage(next(it, None))
            writer.close()
        finally:
            writer.stop()
            if bar is not None:
                bar.close()
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stops a loader's threads when the loop ended early
    return pos


class _Staged:
    """A minibatch on its way to the device: its tensors and, on CUDA, the copy's event."""

    __slots__ = ("tensors", "n_genes", "event")

    def __init__(self, tensors, n_genes, event=None):
        self.tensors, self.n_genes, self.event = tensors, n_genes, event


class _HostToDevice:
    """Minibatches onto the device one ahead of compute (see the module docstring)."""

    def __init__(self, device: torch.device, copy: bool | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy = self.cuda if copy is None else copy
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots = [_InputSlot(pin=self.cuda) for _ in range(2)] if self.copy else []
        self.n = 0

    def stage(self, mb) -> _Staged | None:
        if mb is None:
            return None
        if not self.copy:
            # the CPU reads the host arrays in place; int32 indices are not widened
            return _Staged([torch.from_numpy(np.ascontiguousarray(getattr(mb, f)))
                            for f in _CSR_FIELDS], mb.n_genes)
        slot = self.slots[self.n % len(self.slots)]
        self.n += 1
        host = slot.fill(mb)
        if not self.cuda:
            return _Staged(host, mb.n_genes)  # the CPU computes synchronously: no copy needed
        with torch.cuda.stream(self.stream):
            dev = [h.to(self.device, non_blocking=True) for h in host]
            slot.event.record(self.stream)
        return _Staged(dev, mb.n_genes, slot.event)

    def take(self, staged: _Staged):
        """The staged minibatch, ready for use on the current (compute) stream."""
        from scvi_fast.data import TorchMinibatch

        if staged.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(staged.event)
            for t in staged.tensors:
                # allocated on the side stream, read on the compute stream: keep the memory
                # from being reused before the encoder has read it
                t.record_stream(compute)
        indptr, indices, values = staged.tensors
        return TorchMinibatch(indptr=indptr, indices=indices, values=values, batch=None,
                              labels=None, library=None, obs_idx=None, n_genes=staged.n_genes)


class _InputSlot:
    """Host memory for one minibatch's CSR arrays on their way to the GPU.

    Arrays already in pinned memory (a ``CSRLoader(pin_memory=True)`` gathers into it) are
    sent as they are and held until their copy is done, so that the loader cannot reuse them
    under a running copy; others are copied into reusable buffers (pinned on CUDA) first.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}
        self.event = torch.cuda.Event() if pin else None
        self.held: list[torch.Tensor] = []
        self.n_allocs = 0  # how often a buffer was (re)allocated

    def fill(self, mb) -> list[torch.Tensor]:
        if self.event is not None:
            # the previous copy out of this slot must be done before it is overwritten or its
            # arrays are let go; it was issued two batches ago, so this does not wait in practice
            self.event.synchronize()
        out = []
        for name in _CSR_FIELDS:
            src = torch.from_numpy(np.ascontiguousarray(getattr(mb, name)))
            if self.pin and src.is_pinned():
                out.append(src)
                continue
            buf = self.buffers.get(name)
            n = src.shape[0]
            if buf is None or buf.shape[0] < n or buf.dtype != src.dtype:
                # headroom, so that a slightly larger batch later does not reallocate
                buf = torch.empty(n + n // 4 + 1, dtype=src.dtype, pin_memory=self.pin)
                self.buffers[name] = buf
                self.n_allocs += 1
            dst = buf[:n]
            dst.copy_(src)
            out.append(dst)
        self.held = out
        return out


_STOP = object()


class _Writer:
    """Output slots and the thread that drains them into a sink, in order.

    ``put`` copies a device block into a free slot (asynchronously on CUDA, with an event) and
    queues it; the thread waits for the event, writes the block and frees the slot. An error in
    the thread is raised in the caller at its next ``put`` or at ``close``.
    """

    def __init__(self, sink, device: torch.device, n_slots: int):
        if n_slots < 1:
            raise ValueError(f"max_pending must be at least 1; got {n_slots}")
        self.sink = sink
        self.cuda = device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None] * n_slots
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(n_slots)]
        self.free: queue.Queue = queue.Queue()
        for i in range(n_slots):
            self.free.put(i)
        self.todo: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.n_allocs = 0
        self.max_in_flight = 0  # the most blocks queued or being written at once
        self._in_flight = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="scvi_fast-latent-writer",
                                        daemon=True)
        self._thread.start()

    def _acquire(self) -> int:
        while True:
            if self.error is not None:
                raise self.error
            try:
                slot = self.free.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the embedding's writer thread stopped") from self.error
                continue
            if self.error is not None:
                self.free.put(slot)
                raise self.error
            return slot

    def put(self, pos: int, y: torch.Tensor) -> None:
        slot = self._acquire()
        buf = self.buffers[slot]
        if buf is None or buf.shape[0] < y.shape[0] or buf.shape[1:] != y.shape[1:]:
            buf = torch.empty(y.shape, dtype=torch.float32, pin_memory=self.cuda)
            self.buffers[slot] = buf
            self.n_allocs += 1
        block = buf[: y.shape[0]]
        block.copy_(y, non_blocking=self.cuda)
        event = self.events[slot]
        if event is not None:
            event.record()
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        self.todo.put((pos, slot, y.shape[0], event))

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is _STOP:
                return
            pos, slot, k, event = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()  # this block's copy only, not the whole device
                    block = self.buffers[slot][:k].numpy()
                    check_finite(block, f"the embedding of cells {pos}-{pos + k - 1}")
                    self.sink.write(pos, block)
            except BaseException as err:  # raised in the caller's thread
                self.error = err
            finally:
                with self._lock:
                    self._in_flight -= 1
                self.free.put(slot)

    def close(self) -> None:
        """Write everything queued; raise the thread's error if there was one."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._thread.is_alive():
            self.todo.put(_STOP)
            self._thread.join()


class _Arrays:
    """In-memory result: the means (and the variances, from the second half of each block)."""

    def __init__(self, n_cells: int, n_latent: int, with_var: bool):
        self.n_latent = n_latent
        self.mean = np.empty((n_cells, n_latent), dtype=np.float32)
        self.var = np.empty((n_cells, n_latent), dtype=np.float32) if with_var else None

    def write(self, pos: int, block: np.ndarray) -> None:
        k = block.shape[0]
        if self.var is None:
            self.mean[pos : pos + k] = block
        else:
            self.mean[pos : pos + k] = block[:, : self.n_latent]
            self.var[pos : pos + k] = block[:, self.n_latent :]

    def finish(self):
        return self.mean if self.var is None else (self.mean, self.var)

    def discard(self) -> None:
        pass
