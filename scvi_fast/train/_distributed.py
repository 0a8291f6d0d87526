"""Data-parallel training and embedding on ``torch.distributed`` (DDP, launched by torchrun).

One process per device. Every rank builds the same model, the same train/validation split
(same seed) and a loader over its own shard of every epoch (``CSRLoader(rank=, world_size=)``),
so ranks read disjoint cells from the shared store or AnnData and take the same number of
steps. :class:`torch.nn.parallel.DistributedDataParallel` averages the gradients; metrics are
summed over ranks (per-cell sums and cell counts) before they enter the history; only rank 0
writes checkpoints and outputs while the others wait at a barrier.

BatchNorm is kept **local** (each rank normalises with its own minibatch's statistics), not
converted to ``SyncBatchNorm``:

* it is what scvi-tools does on several GPUs (Lightning's DDP keeps local BatchNorm unless
  asked otherwise), so a model trained here behaves like one trained there;
* a per-rank minibatch of 128 cells (1024 in the Census recipe) already gives precise
  statistics over 128-512 hidden units; synchronising them would add two blocking
  collectives per BatchNorm layer and step (forward and backward), which the gradient
  all-reduce cannot overlap and which cost most across nodes;
* ``torch.nn.SyncBatchNorm`` runs on GPUs only, so the CPU (gloo) path, and CI with it, would
  train a different model than the GPU path.

Running statistics are not broadcast at every step (``broadcast_buffers=False``); instead they
are averaged over ranks at the end of every training pass and before every checkpoint, so all
ranks validate, save and resume with the same buffers, and the saved estimate pools every
rank's minibatches. Module and state-dict keys are unchanged (DDP wraps the module; nothing
inside it is replaced).

Launching: under ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``)
:func:`setup` joins the job; outside one, :func:`launch` starts ``nproc`` local ranks through
torch's elastic launcher (the engine behind torchrun), which also restarts failed workers.
"""

from __future__ import annotations

import atexit
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

#: rank r seeds its sampling noise and dropout with ``seed + RNG_STRIDE * r``
RNG_STRIDE = 1_000_003

_CONTEXT: DistContext | None = None


@dataclass
class DistContext:
    """This process's place in a distributed job and the collectives the trainer uses."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel`` around ``module`` (parameters are broadcast from rank 0)."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # BatchNorm running statistics are not synced at each forward (see sync_buffers);
        # newer torch spells this forward_sync_buffers (buffers are still synced at init).
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **no_sync,
        )

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place; returns it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    @torch.no_grad()
    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running mean/variance) over ranks."""
        bufs = [b for b in module.buffers() if b.is_floating_point()]
        if not bufs or self.world_size == 1:
            return
        flat = torch.cat([b.reshape(-1).double() for b in bufs])
        self.all_reduce_sum(flat).div_(self.world_size)
        offset = 0
        for b in bufs:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view_as(b))
            offset += n


def env_world_size() -> int:
    """``WORLD_SIZE`` of the launcher that started this process (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is a rank of a distributed job (torchrun env or a live group)."""
    if dist.is_available() and dist.is_initialized():
        return True
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def active() -> DistContext | None:
    """The context made by :func:`setup` when it spans more than one rank, else None."""
    if _CONTEXT is not None and _CONTEXT.world_size > 1 and dist.is_initialized():
        return _CONTEXT
    return None


def is_main_process() -> bool:
    """Rank 0 of a job, or any process outside one."""
    if _CONTEXT is not None:
        return _CONTEXT.is_main
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _set_cpu_threads(local_world_size: int) -> None:
    """Split the cores between the local ranks unless ``OMP_NUM_THREADS`` says otherwise."""
    if os.environ.get("OMP_NUM_THREADS"):
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass


def setup(device: str | torch.device = "auto", backend: str | None = None,
          device_ids=None) -> DistContext:
    """Join the job this process was launched into (idempotent).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by torchrun
    and by :func:`launch`) and initialises the default process group unless one exists:
    NCCL on CUDA, gloo on the CPU. ``device``: ``"auto"`` is ``cuda:LOCAL_RANK`` when CUDA is
    present, else the CPU; ``"cuda"`` (with or without an index) always means
    ``cuda:LOCAL_RANK``, one device per rank, or ``cuda:device_ids[LOCAL_RANK]`` when
    ``device_ids`` lists one GPU per local rank. On the CPU each rank gets
    ``cpu_count // LOCAL_WORLD_SIZE`` threads unless ``OMP_NUM_THREADS`` is set.
    """
    global _CONTEXT
    if not launched():
        raise RuntimeError(
            "strategy='ddp' needs a distributed launcher: run under `torchrun --nproc-per-node "
            "N ...`, or pass devices=N to model.train to launch N local ranks"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if not (isinstance(device, str) and device == "auto") else None
    use_cuda = torch.cuda.is_available() if dev is None else dev.type == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but CUDA is not available")
        index = local_rank
        if device_ids is not None and len(device_ids) > 1:
            if local_rank >= len(device_ids):
                raise RuntimeError(f"local rank {local_rank} has no GPU in devices={list(device_ids)}")
            index = int(device_ids[local_rank])
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "launch at most one process per GPU"
            )
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs = {"device_id": dev} if use_cuda else {}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # The elastic agent's store outlives a restart and still holds the failed
            # attempt's keys: without a namespace per attempt, a restarted gloo rank can
            # read a dead rank's address and fail to connect.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  is_master=False, timeout=timedelta(minutes=30))
            kwargs |= {"store": dist.PrefixStore(f"scvi_fast/attempt_{attempt}/", store),
                       "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
        dist.init_process_group(backend=backend, **kwargs)
        atexit.register(_destroy)
    world_size = dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if dev.type == "cpu":
        _set_cpu_threads(local_world_size)
    _CONTEXT = DistContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=dev,
        backend=dist.get_backend(),
    )
    return _CONTEXT


def _destroy() -> None:
    global _CONTEXT
    _CONTEXT = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable, args: tuple = (), nproc: int = 1, max_restarts: int = 0,
           monitor_interval: float = 0.1) -> dict[int, object]:
    """Run ``fn(*args)`` in ``nproc`` local ranks through ``torch.distributed``'s elastic launcher.

    The same engine as ``torchrun --standalone --nproc-per-node nproc``: a c10d rendezvous on
    a free local port, workers started with ``spawn`` (``fn`` and ``args`` must pickle; ``fn``
    must be importable by name), and up to ``max_restarts`` restarts of the whole group when
    a worker fails (``TORCHELASTIC_RESTART_COUNT`` tells the workers which attempt they are).

    Returns ``{local_rank: return value}``. A failed job raises :class:`RuntimeError` carrying
    the failing rank's error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"nproc must be at least 1; got {nproc}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=int(nproc),
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=int(max_restarts),
        monitor_interval=monitor_interval,
        start_method="spawn",
    )
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        msg = failure.message
        if isinstance(msg, dict):  # the worker's error file: message and its traceback
            msg = f"{msg.get('message')}\n{msg.get('extraInfo', {}).get('py_callstack', '')}"
        raise RuntimeError(
            f"distributed run failed on local rank {rank} (exit code {failure.exitcode}): "
            f"{msg or 'see the log above'}"
        ) from err
