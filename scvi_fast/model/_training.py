"""Training a model: the train/validation split, loaders, the trainer, and data-parallel runs.

:func:`fit` runs in this process (one rank of a job under ``torchrun``, or no job);
:func:`fit_launched` starts local ranks through torch's elastic launcher, each running
:func:`ddp_train_worker`, and brings rank 0's weights back.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from scvi_fast import data as _data
from scvi_fast.model import _io
from scvi_fast.model._config import INFERENCE_BATCH_SIZE, TrainConfig, prefetch_default
from scvi_fast.model._registry import Registry
from scvi_fast.train import Trainer, resolve_device
from scvi_fast.train import _distributed

#: ``train()`` arguments that choose how to run, not what to train
RUN_ARGS = ("strategy", "devices", "max_restarts", "device", "accelerator", "loader_kwargs")


def split(n: int, train_size: float, validation_size: float | None, batch_size: int, seed: int,
          world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training and validation rows: a ``np.random.RandomState(seed)`` permutation.

    As scvi-tools: ``ceil(train_size * n)`` training cells, the rest (or
    ``floor(validation_size * n)``) for validation. Data-parallel runs give every rank the same
    number of training cells (the remainder goes to validation), and no rank ends an epoch on a
    minibatch of one or two cells (BatchNorm cannot train on it: those move to validation).
    """
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1]; got {train_size}")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    else:
        if not 0.0 <= validation_size < 1.0 or train_size + validation_size > 1.0:
            raise ValueError("validation_size must be in [0, 1) with train_size + validation_size <= 1")
        n_val = math.floor(n * validation_size)
    n_val, n_train = n_val + n_train % world_size, n_train - n_train % world_size
    rest = (n_train // world_size) % batch_size
    if 0 < rest < 3 and n_train > rest * world_size:
        n_train -= rest * world_size
        n_val += rest * world_size
    perm = np.random.RandomState(seed=seed).permutation(n)
    return np.sort(perm[n_val : n_val + n_train]), np.sort(perm[:n_val])


def _strategy(call: dict) -> str:
    strategy, devices = call["strategy"], call["devices"]
    if strategy not in ("auto", "ddp"):
        raise ValueError(f"strategy must be 'auto' or 'ddp'; got {strategy!r}")
    if strategy == "auto" and (_distributed.env_world_size() > 1
                               or (isinstance(devices, int) and devices > 1)):
        return "ddp"
    return strategy


def fit(model, call: dict):
    """``model.train(**call)``: run here, or launch local ranks for ``strategy="ddp"``."""
    strategy = _strategy(call)
    if strategy == "ddp" and not _distributed.launched():
        return fit_launched(model, call)
    device_arg = call["accelerator"] or call["device"]
    ctx = _distributed.setup(device_arg) if strategy == "ddp" else None
    rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    source = model._source()
    cfg = TrainConfig.resolve(model.preset, source.n_cells,
                              **{k: v for k, v in call.items() if k not in RUN_ARGS})
    train_idx, val_idx = split(source.n_cells, cfg.train_size, cfg.validation_size,
                               cfg.batch_size, cfg.seed, world_size)
    model.train_indices, model.validation_indices = train_idx, val_idx
    model.device = ctx.device if ctx is not None else resolve_device(
        call["accelerator"] if call["accelerator"] not in (None, "auto") else call["device"])
    loader_kwargs = dict(call["loader_kwargs"])
    loader_kwargs.setdefault("prefetch", prefetch_default(model.device))
    loader_kwargs.setdefault("pin_memory", model.device.type == "cuda")
    train_loader = _data.CSRLoader(
        source, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, indices=train_idx,
        drop_last=False, rank=rank, world_size=world_size, **loader_kwargs,
    )
    val_loader = None
    if len(val_idx):
        val_loader = _data.CSRLoader(
            source, batch_size=max(cfg.batch_size, INFERENCE_BATCH_SIZE), shuffle=False,
            indices=val_idx[slice(*_data.shard_range(len(val_idx), rank, world_size))],
            **loader_kwargs)
    model.trainer = None  # a previous run's DDP wrapper releases its gradient hooks first
    model.trainer = Trainer(model.module, train_loader, val_loader, device=model.device,
                            distributed=ctx, **cfg.trainer_kwargs())
    model.history_ = model.trainer.fit(cfg.max_epochs, resume=cfg.resume)
    model.module.eval()
    model.is_trained_ = True
    model.train_params_ = cfg.summary()
    return model


def fit_launched(model, call: dict):
    """``train(strategy="ddp")`` outside a launcher: run it in local ranks, keep rank 0's result."""
    dev = call["accelerator"] or call["device"]
    on_cuda = (torch.cuda.is_available() and str(dev) in ("auto", "gpu")
               or str(dev).startswith("cuda"))
    nproc = call["devices"]
    if nproc == "auto":
        nproc = torch.cuda.device_count() if on_cuda else 1
    data = model.adata
    if isinstance(data, _data.CSRStore):
        data = str(data.path)
    elif getattr(data, "isbacked", False):
        data = ("h5ad", str(data.filename))
    train_kwargs = {k: v for k, v in call.items()
                    if k not in ("devices", "max_restarts", "loader_kwargs")}
    payload = {
        "cls": type(model),  # pickled by name: each rank imports it
        "data": data, "registry": model.registry.to_dict(), "config": _io.config_of(model),
        "state": {k: v.detach().cpu() for k, v in model.module.state_dict().items()},
        "train": train_kwargs | {"strategy": "ddp"} | call["loader_kwargs"],
    }
    results = _distributed.launch(ddp_train_worker, (payload,), nproc=int(nproc),
                                  max_restarts=call["max_restarts"])
    res = results[0]
    model.module.load_state_dict(res["state"])
    model.module.eval()
    model.history_ = res["history"]
    model.train_indices, model.validation_indices = res["train_indices"], res["validation_indices"]
    model.train_params_ = res["train_params"]
    model.trainer = SimpleNamespace(**res["trainer"])
    model.device = resolve_device("cuda" if on_cuda else "cpu")
    model.is_trained_ = True
    return model


def ddp_train_worker(payload: dict):
    """One rank of ``SCVI.train(strategy="ddp", devices=N)`` (started by the elastic launcher)."""
    data = payload["data"]
    if isinstance(data, tuple):
        import anndata

        data = anndata.read_h5ad(data[1], backed="r")
    state = {f"module.{k}": v for k, v in payload["state"].items()}
    model = payload["cls"]._from_parts(payload["config"], state,
                                       Registry.from_dict(payload["registry"]))
    model.adata = data
    model.train(**payload["train"])
    if not _distributed.is_main_process():
        return None
    t = model.trainer
    return {
        "state": {k: v.detach().cpu() for k, v in model.module.state_dict().items()},
        "history": model.history_,
        "train_indices": model.train_indices,
        "validation_indices": model.validation_indices,
        "train_params": model.train_params_,
        "trainer": {
            "global_step": t.global_step, "epoch": t.epoch, "stopped_early": t.stopped_early,
            "train_time_s": t.train_time_s, "cells_trained": t.cells_trained,
            "epoch_times": list(t.epoch_times), "world_size": _distributed.env_world_size(),
        },
    }
