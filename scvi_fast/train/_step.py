"""The training and evaluation step at fixed shapes, captured whole as a CUDA graph.

At the Census preset a 1024-cell step has 1-2 ms on a GPU. An eager PyTorch step launches on
the order of a hundred kernels from Python, each with microseconds of host overhead, and any
host-device synchronisation stalls the queue. So on CUDA the whole step (forward, backward,
optimiser, metric accumulation) is captured once per minibatch shape as a ``CUDAGraph`` and
replayed:

* the minibatch lives in static device buffers (:class:`StaticBatches`): ``indptr`` for ``n``
  cells, and ``indices`` / ``values`` with a padded capacity (every CSR op reads entries only
  through ``indptr``, so whatever lies past ``indptr[-1]`` is ignored); two slots, so that the
  host-to-device copy of the next minibatch (from pinned memory, on a copy stream) overlaps the
  replay of the current one;
* the KL weight is a device scalar filled once per epoch, and the metric sums are device
  tensors read once per epoch: nothing in the step reads a value back to the host;
* Adam is fused and ``capturable``; gradients live in the graphs' memory pool;
* each (pass, cell count, slot) runs eagerly the first time it is seen (lazy initialisation,
  kernel compilation and autotuning happen there, on a side stream) and is captured and
  replayed from the second time on. A failed capture warns and continues eagerly.

``mode="static"`` runs the same step body on the same static buffers without capture: on the
CPU that is how the capturable step is tested (it gives the eager step's numbers), and on a GPU
it is the debugging path beside plain ``"eager"`` (a fresh device copy of every minibatch).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import numpy as np
import torch

#: ``(name, dtype, sized by)`` of the static buffers; "cells" fields hold ``n`` (+1) values,
#: "entries" fields the padded capacity
_FIELDS = (
    ("indptr", torch.int64, "cells"),
    ("batch", torch.int64, "cells"),
    ("labels", torch.int64, "cells"),
    ("library", torch.float32, "cells"),
    ("indices", torch.int32, "entries"),
    ("values", torch.float32, "entries"),
)
#: optional per-cell fields (the minibatch's covariates): ``name -> dtype``; each gets a
#: ``(cells, width)`` buffer (``(cells,)`` for the size factor) once a minibatch carries it
_COVARIATE_FIELDS = {"cat_covs": torch.int64, "cont_covs": torch.float32,
                     "size_factor": torch.float32}
STEP_MODES = ("auto", "eager", "static", "graph")


class DeviceBatch:
    """A minibatch as device tensors (the attributes the VAE reads), views of static buffers."""

    __slots__ = ("indptr", "indices", "values", "batch", "labels", "library", "n_genes",
                 *_COVARIATE_FIELDS)

    def __init__(self, n_genes: int, **fields: torch.Tensor):
        self.n_genes = n_genes
        for name in _COVARIATE_FIELDS:
            setattr(self, name, None)
        for name, t in fields.items():
            setattr(self, name, t)

    @property
    def n_cells(self) -> int:
        return int(self.indptr.shape[0] - 1)


class StaticBatches:
    """Slots of device buffers that hold a CSR minibatch at fixed addresses.

    Parameters
    ----------
    device
        Where the buffers live.
    max_cells
        The largest minibatch (cells).
    capacity
        Stored entries per slot; a minibatch with more grows every slot (and bumps
        :attr:`generation`, which invalidates graphs captured on the old buffers).
    n_genes
        Columns of the counts.
    n_slots
        Buffers used in turn. On CUDA, the copy into a slot waits (on the device) until the
        step that last read that slot is done, so two slots let a copy overlap a step.

    On CUDA the copies run on a side stream from the minibatch's host arrays (asynchronous when
    they are pinned, see ``CSRLoader(pin_memory=True)``); the host arrays are held until their
    copy is known to be complete.
    """

    def __init__(self, device: torch.device, max_cells: int, capacity: int, n_genes: int,
                 n_slots: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.n_genes = int(n_genes)
        self.n_slots = int(n_slots)
        self.generation = 0
        self._next = 0
        self._held: list = [None] * self.n_slots
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in range(self.n_slots)]
            self._free = [torch.cuda.Event() for _ in range(self.n_slots)]
        #: covariate fields held: ``name -> trailing shape`` (``()`` or ``(width,)``)
        self.covariates: dict[str, tuple[int, ...]] = {}
        self._allocate(int(max_cells), max(1, int(capacity)))

    def _fields(self):
        yield from ((name, dt, by, ()) for name, dt, by in _FIELDS)
        for name, tail in self.covariates.items():
            yield name, _COVARIATE_FIELDS[name], "cells", tail

    def _allocate(self, max_cells: int, capacity: int) -> None:
        self.max_cells, self.capacity = max_cells, capacity
        size = {"cells": max_cells, "entries": capacity}
        self.slots = [
            {name: torch.zeros((size[by] + (name == "indptr"), *tail), dtype=dt,
                               device=self.device)
             for name, dt, by, tail in self._fields()}
            for _ in range(self.n_slots)
        ]
        # pinned host mirrors: a copy from pageable memory would make the host wait for the
        # copy stream (and so for the step that last read the slot); arrays that are already
        # pinned (the loader's entries with pin_memory=True) are copied directly
        self.host_slots = [
            {name: torch.empty((size[by] + (name == "indptr"), *tail), dtype=dt,
                               pin_memory=True)
             for name, dt, by, tail in self._fields()}
            for _ in range(self.n_slots)
        ] if self.cuda else None

    def _grow(self, n_cells: int, nnz: int) -> None:
        """Reallocate every slot larger (rare: the initial capacity is an upper bound), or
        with the covariate fields of :attr:`covariates` (once, at the first minibatch)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._held = [None] * self.n_slots
        self._allocate(max(n_cells, self.max_cells), max(int(nnz * 1.25) + 1, self.capacity))
        self.generation += 1

    def _covariates_of(self, mb) -> dict[str, tuple[int, ...]]:
        return {name: tuple(np.shape(v)[1:]) for name in _COVARIATE_FIELDS
                if (v := getattr(mb, name, None)) is not None}

    def load(self, mb) -> tuple[int, DeviceBatch]:
        """Copy host minibatch ``mb`` (a :class:`~scvi_fast.data.CSRMinibatch`) into the next
        slot; returns ``(slot, device views for mb's cells)``. Work queued on the current stream
        afterwards sees the copied data; call :meth:`release` once the step that reads the slot
        has been queued."""
        n, nnz = mb.n_cells, mb.nnz
        covs = self._covariates_of(mb)
        if covs != self.covariates:
            self.covariates = covs
            self._grow(n, nnz)
        elif n > self.max_cells or nnz > self.capacity:
            self._grow(n, nnz)
        slot = self._next
        self._next = (slot + 1) % self.n_slots
        bufs = self.slots[slot]
        views = {
            "indptr": bufs["indptr"][: n + 1], "batch": bufs["batch"][:n],
            "labels": bufs["labels"][:n], "library": bufs["library"][:n],
            "indices": bufs["indices"], "values": bufs["values"],
        }
        sources = {
            "indptr": mb.indptr, "batch": mb.batch, "labels": mb.labels,
            "library": mb.library, "indices": mb.indices, "values": mb.values,
        }
        for name in self.covariates:
            views[name] = bufs[name][:n]
            sources[name] = getattr(mb, name)
        if self.cuda:
            # the host arrays of this slot's previous minibatch may go back to the loader once
            # their copy has finished (queued two loads ago: normally long done)
            self._ready[slot].synchronize()
            stream = self.copy_stream
            stream.wait_event(self._free[slot])
            ctx = torch.cuda.stream(stream)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            for name, src in sources.items():
                k = nnz if name in ("indices", "values") else views[name].shape[0]
                host = torch.from_numpy(np.ascontiguousarray(src))
                if self.cuda and not host.is_pinned():
                    host = self.host_slots[slot][name][:k].copy_(host)
                views[name][:k].copy_(host, non_blocking=self.cuda)
        if self.cuda:
            self._ready[slot].record(stream)
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
            self._held[slot] = mb
        return slot, DeviceBatch(self.n_genes, **views)

    def release(self, slot: int) -> None:
        """The step reading ``slot`` has been queued on the current stream: the next copy into
        the slot waits for it."""
        if self.cuda:
            self._free[slot].record(torch.cuda.current_stream(self.device))


class StepRunner:
    """Runs the training and evaluation step of a VAE, eagerly or as replayed CUDA graphs.

    Parameters
    ----------
    net
        The module to train (the VAE, or its DDP wrapper).
    module
        The VAE itself (evaluation runs on it, not on the wrapper).
    optimizer
        Its optimiser (``capturable=True`` on CUDA for graph mode).
    device
        The device the module lives on.
    mode
        ``"eager"``, ``"static"`` or ``"graph"`` (see the module docstring).
    autocast_dtype
        ``torch.bfloat16`` to autocast the step, or None.
    warmup
        Eager runs of each (pass, cells, slot) before it is captured.

    The metric sums of the pass in progress are :attr:`sums` (train) and :attr:`val_sums`:
    ``[sum(rec + kl), sum(rec), sum(kl)]`` in float64, on the device.

    Non-finite values: after the backward pass, one fused check flags a non-finite loss or
    gradient; a fused Adam then skips that step's update (``found_inf``, as under a gradient
    scaler), so the weights stay those of the last good step, and the pass's first bad step
    (1-based, counted by :attr:`step_count`) lands in :attr:`bad_step` (0: none). Both live on
    the device; the trainer reads them when it reads the metrics.
    """

    def __init__(self, net, module, optimizer, device: torch.device, mode: str = "eager",
                 autocast_dtype=None, warmup: int = 1):
        if mode not in ("eager", "static", "graph"):
            raise ValueError(f"step mode must be 'eager', 'static' or 'graph'; got {mode!r}")
        self.device = torch.device(device)
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use mode 'static' or 'eager'")
        self.net, self.module, self.optimizer = net, module, optimizer
        self.mode = mode
        self.autocast_dtype = autocast_dtype
        self.warmup = int(warmup)
        self.kl_weight = torch.zeros((), dtype=torch.float32, device=self.device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.step_count = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self._found = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._one = torch.ones(1, dtype=torch.float32, device=self.device)
        # fused Adam skips its update when found_inf is non-zero (other optimisers cannot)
        if optimizer is not None and optimizer.defaults.get("fused"):
            optimizer.found_inf = self._found.view(())  # a 0-d view, as the step counts
        self._graphs: dict = {}
        self._seen: Counter = Counter()
        self._pool = None
        self._generation = 0
        self._side = torch.cuda.Stream(self.device) if mode == "graph" else None

    # ---- the step body: everything here is captured ------------------------------------
    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
            # cached casts of the weights would be stale in a replayed graph
            cache_enabled=self.mode != "graph",
        )

    def _body(self, x, train: bool) -> None:
        with self._autocast():
            _, _, out = (self.net if train else self.module)(x, kl_weight=self.kl_weight)
        if train:
            out.loss.backward()
            self._check_finite(out.loss)
            self.optimizer.step()
        rec, kl = out.reconstruction_loss.detach(), out.kl_local.detach()
        (self.sums if train else self.val_sums).add_(
            torch.stack([(rec + kl).sum(), rec.sum(), kl.sum()]).double()
        )

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Flag a non-finite loss or gradient of this step (on the device, no host read)."""
        self._found.copy_((~torch.isfinite(loss.detach().float())).float().reshape(1))
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        if grads:
            # ORs "any non-finite" into _found; multiplying by one leaves the gradients as they are
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found, self._one)
        self.step_count += 1
        first = (self.bad_step == 0) & (self._found[0] > 0)
        self.bad_step.copy_(torch.where(first, self.step_count, self.bad_step))

    def new_pass(self, train: bool) -> None:
        """Zero the pass's metric sums (and, for training, its step count and bad step)."""
        (self.sums if train else self.val_sums).zero_()
        if train:
            self.step_count.zero_()
            self.bad_step.zero_()

    def _eager(self, x, train: bool) -> None:
        if train:
            self.optimizer.zero_grad(set_to_none=True)
            self._body(x, True)
        else:
            with torch.no_grad():
                self._body(x, False)

    # ---- dispatch --------------------------------------------------------------------
    def run(self, x, train: bool, slot: int = 0, generation: int = 0) -> None:
        """One step on minibatch ``x`` (device tensors; in ``"static"``/``"graph"`` modes the
        views of :class:`StaticBatches` slot ``slot``, whose buffers are of ``generation``)."""
        if self.mode != "graph":
            self._eager(x, train)
            return
        if generation != self._generation:  # the static buffers were reallocated
            self._graphs.clear()
            self._generation = generation
        key = (train, x.n_cells, slot)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if self._seen[key] < self.warmup:
            self._seen[key] += 1
            current = torch.cuda.current_stream(self.device)
            self._side.wait_stream(current)
            with torch.cuda.stream(self._side):
                self._eager(x, train)
            current.wait_stream(self._side)
            return
        graph = self._capture(x, train)
        if graph is None:  # capture failed: this step (not executed by the capture) runs eagerly
            self._eager(x, train)
            return
        self._graphs[key] = graph
        graph.replay()

    def _capture(self, x, train: bool):
        if train:
            self.optimizer.zero_grad(set_to_none=True)  # the graph allocates its own gradients
        graph = torch.cuda.CUDAGraph()
        try:
            ctx = contextlib.nullcontext() if train else torch.no_grad()
            with ctx, torch.cuda.graph(graph, pool=self._pool):
                self._body(x, train)
        except Exception as err:  # noqa: BLE001 - the eager step still works
            warnings.warn(
                f"capturing the {'training' if train else 'evaluation'} step as a CUDA graph "
                f"failed ({type(err).__name__}: {err}); continuing without graphs "
                "(train(cuda_graph=False) skips the attempt)",
                RuntimeWarning, stacklevel=3,
            )
            self.mode = "static"
            self._graphs.clear()
            if train:
                self.optimizer.zero_grad(set_to_none=True)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        return graph

    def invalidate(self) -> None:
        """Drop the captured graphs (they baked in values that changed, such as the learning
        rate); the next steps capture afresh."""
        self._graphs.clear()

    @property
    def n_graphs(self) -> int:
        return len(self._graphs)


def resolve_step_mode(mode: str, device: torch.device, distributed: bool = False,
                      compiled: bool = False) -> str:
    """``"auto"``: CUDA graphs on a CUDA device (not under DDP or ``torch.compile``, whose
    own machinery does not mix with a hand-captured graph), eager elsewhere."""
    if mode not in STEP_MODES:
        raise ValueError(f"step mode must be one of {STEP_MODES}; got {mode!r}")
    device = torch.device(device)
    if mode == "auto":
        return "graph" if device.type == "cuda" and not distributed and not compiled else "eager"
    if mode == "graph":
        if device.type != "cuda":
            raise ValueError(
                "cuda_graph=True needs a CUDA device; the model is on "
                f"{device}. Use cuda_graph=None (automatic) or False."
            )
        if distributed or compiled:
            raise ValueError("CUDA graphs cannot be combined with DDP or compile_dense=True")
    return mode


def max_batch_nnz(loader) -> int:
    """An upper bound of the stored entries of any minibatch ``loader`` can emit: the sum of
    its ``batch_size`` largest rows (so the static buffers never have to grow)."""
    source, rows = loader.source, loader.indices
    if rows.size == 0:
        return 1
    per_row = np.diff(np.asarray(source.indptr))
    per_row = per_row[rows] if rows.size != per_row.size else per_row
    k = min(loader.batch_size, per_row.size)
    return int(np.partition(per_row, per_row.size - k)[per_row.size - k:].sum())
