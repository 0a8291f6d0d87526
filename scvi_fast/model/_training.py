"""Training a model: the train/validation split, loaders, the trainer, and data-parallel runs.

:func:`fit` runs in this process (one rank of a job under ``torchrun``, or no job);
:func:`fit_launched` starts local ranks through torch's elastic launcher, each running
:func:`ddp_train_worker`, and brings rank 0's weights back.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np

from scvi_fast import data as _data
from scvi_fast.model import _io, _train_args
from scvi_fast.model._config import INFERENCE_BATCH_SIZE, TrainConfig, prefetch_default
from scvi_fast.model._registry import Registry
from scvi_fast.module import set_online_update
from scvi_fast.train import Trainer
from scvi_fast.train import _distributed

#: ``train()`` arguments that choose how to run, not what to train
RUN_ARGS = ("strategy", "devices", "max_restarts", "device", "accelerator", "kwargs",
            "datasplitter_kwargs", "plan_config", "plan_kwargs", "datamodule", "trainer_config",
            "load_sparse_tensor", "enable_progress_bar")


def split(n: int, train_size: float | None, validation_size: float | None, batch_size: int,
          seed: int, world_size: int = 1, shuffle: bool = True, drop_last: bool = False,
          external_indexing=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted training, validation and test rows, as scvi-tools' ``DataSplitter``.

    ``ceil(train_size * n)`` training cells and ``floor(validation_size * n)`` (default: the
    rest) validation cells. ``train_size=None`` means 0.9, and a last training minibatch of
    1-2 cells then moves to validation (with an explicit ``train_size`` scvi-tools only
    warns). Rows are a ``np.random.RandomState(seed)`` permutation, or in order with
    ``shuffle=False``: validation first, then training, then test. ``external_indexing``
    (``[train, validation, test]``) gives the rows instead. Data-parallel runs give every rank
    the same number of training cells (the remainder goes to validation), and no rank ends an
    epoch on a minibatch of one or two cells (those move to validation).
    """
    if external_indexing is not None:
        train, val, test = _external_split(n, external_indexing)
        _warn_small_last(len(train) % batch_size, drop_last, given=True)
        return train, val, test
    given = bool(train_size)
    train_size = float(train_size) if given else 0.9
    if not 0.0 < train_size <= 1.0:
        raise ValueError("Invalid train_size. Must be: 0 < train_size <= 1")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    elif not 0.0 <= validation_size < 1.0:
        raise ValueError("Invalid validation_size. Must be 0 <= validation_size < 1")
    elif train_size + validation_size > 1:
        raise ValueError("train_size + validation_size must be between 0 and 1")
    else:
        n_val = math.floor(n * validation_size)
    if n_train == 0:
        raise ValueError(f"With n_samples={n}, train_size={train_size} and validation_size="
                         f"{validation_size}, the resulting train set will be empty.")
    rest = n_train % batch_size
    if world_size == 1 and 0 < rest < 3 and not drop_last:
        _warn_small_last(rest, drop_last, given)
        if not given:
            n_train -= rest
            n_val += rest if n_val > 0 else 0
    if world_size > 1:
        n_val, n_train = n_val + n_train % world_size, n_train - n_train % world_size
        rest = (n_train // world_size) % batch_size
        if 0 < rest < 3 and n_train > rest * world_size:
            n_train -= rest * world_size
            n_val += rest * world_size
    order = np.random.RandomState(seed=seed).permutation(n) if shuffle else np.arange(n)
    return (np.sort(order[n_val : n_val + n_train]), np.sort(order[:n_val]),
            np.sort(order[n_val + n_train :]))


def _warn_small_last(rest: int, drop_last: bool, given: bool) -> None:
    if not 0 < rest < 3 or drop_last:
        return
    msg = (f"Last batch will have a small size of {rest} samples. Consider changing batch_size "
           "in model.train to avoid errors during model training." if given else
           f"{rest} cells moved from training set to validation set. if you want to avoid it "
           "please use train_size parameter during train.")
    warnings.warn(msg, UserWarning, stacklevel=5)


def _external_split(n: int, external_indexing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scvi-tools' ``external_indexing`` checks: index arrays, no duplicates, no overlaps,
    every row in one of the sets."""
    if not isinstance(external_indexing, list):
        raise ValueError("External indexing is not of list type")
    parts = list(external_indexing) + [None] * (3 - len(external_indexing))
    if len(parts) != 3:
        raise ValueError("external_indexing holds at most three arrays (train, validation, test)")
    parts = [np.array([], dtype=np.int64) if p is None else p for p in parts]
    if not all(isinstance(p, np.ndarray) for p in parts):
        raise ValueError("One of the given external indexing arrays is not a np.array")
    parts = [p.astype(np.int64).reshape(-1) for p in parts]
    for p, name in zip(parts, ("train", "valid", "test")):
        if len(np.unique(p)) < len(p):
            raise ValueError(f"There are duplicate indexing in {name} set")
        if len(p) and (p.min() < 0 or p.max() >= n):
            raise IndexError(f"external_indexing {name} indices outside [0, {n})")
    sets = [set(p.tolist()) for p in parts]
    for (a, b), names in (((0, 1), "train and valid"), ((0, 2), "train and test"),
                          ((2, 1), "test and valid")):
        if sets[a] & sets[b]:
            raise ValueError(f"There are overlapping indexing between {names} sets")
    if sum(len(x) for x in sets) < n:
        raise ValueError("There are missing indices please fix or remove those lines")
    if len(parts[0]) == 0:
        raise ValueError("external_indexing has an empty training set")
    return tuple(np.sort(p) for p in parts)


def _merge_trainer_config(call: dict, train_fn) -> None:
    """``trainer_config`` entries: those naming ``train()`` parameters apply where the call
    left the default; the rest join ``**kwargs`` (explicit keyword arguments win)."""
    config = _train_args.merge_config(call["trainer_config"], None, "trainer")
    if not config:
        return
    import inspect

    params = inspect.signature(train_fn).parameters
    for k, v in config.items():
        if k in params and k != "kwargs":
            if call[k] == params[k].default:
                call[k] = v
        else:
            call["kwargs"].setdefault(k, v)


def _prepare(call: dict, train_fn) -> dict:
    """Check and normalise ``train()``'s arguments (scvi-tools' and scvi_fast's spellings);
    ``train_fn``: the ``train`` method whose defaults ``trainer_config`` may replace."""
    call = dict(call)
    call["kwargs"] = dict(call["kwargs"])
    if call["datamodule"] is not None:
        raise NotImplementedError("datamodule is not supported: scvi_fast trains on the model's "
                                  "AnnData or CSR store")
    _merge_trainer_config(call, train_fn)
    loader = _train_args.loader_options(call["kwargs"])
    split_opts, ds_loader = _train_args.datasplitter_options(call["datasplitter_kwargs"])
    call["loader_kwargs"] = ds_loader | loader
    call["split"] = split_opts
    call["plan"] = _train_args.check_plan(
        _train_args.merge_config(call["plan_config"], call["plan_kwargs"], "plan"))
    call["precision"] = _train_args.precision_name(call["precision"])
    if call["progress_bar"] is None:
        call["progress_bar"] = bool(call["enable_progress_bar"])
    call["strategy"] = _train_args.strategy_name(call["strategy"])
    call["resolved"] = _train_args.resolve_devices(call["accelerator"], call["devices"],
                                                  call["device"])
    return call


def fit(model, call: dict):
    """``model.train(**call)``: run here, or launch local ranks for a data-parallel run."""
    call = _prepare(call, type(model).train)
    devs = call["resolved"]
    strategy = call["strategy"]
    if _distributed.env_world_size() > 1 or devs.nproc > 1:
        strategy = "ddp"
    if strategy == "ddp" and not _distributed.launched():
        if devs.nproc > 1:
            return fit_launched(model, call)
        strategy = "auto"  # one device: nothing to distribute
    ctx = (_distributed.setup(devs.device_type, device_ids=devs.ids)
           if strategy == "ddp" else None)
    rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    source = model._source()
    cfg = TrainConfig.resolve(
        model.preset, source.n_cells, plan=call["plan"],
        shuffle_set_split=call["shuffle_set_split"],
        drop_last=bool(call["split"].get("drop_last", False)),
        **{k: v for k, v in call.items()
           if k not in RUN_ARGS + ("loader_kwargs", "split", "plan", "resolved",
                                   "shuffle_set_split")})
    train_idx, val_idx, test_idx = split(
        source.n_cells, cfg.train_size, cfg.validation_size, cfg.batch_size, cfg.seed,
        world_size, shuffle=cfg.shuffle_set_split, drop_last=cfg.drop_last,
        external_indexing=call["split"].get("external_indexing"))
    model.train_indices, model.validation_indices = train_idx, val_idx
    model.test_indices = test_idx
    model.device = ctx.device if ctx is not None else devs.device
    loader_kwargs = dict(call["loader_kwargs"])
    loader_kwargs.setdefault("prefetch", prefetch_default(model.device))
    loader_kwargs.setdefault("pin_memory", model.device.type == "cuda")
    train_loader = _data.CSRLoader(
        source, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, indices=train_idx,
        drop_last=cfg.drop_last, rank=rank, world_size=world_size, **loader_kwargs,
    )
    val_loader = None
    if len(val_idx) and cfg.check_val_every_n_epoch is not None:
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
    """A data-parallel ``train()`` outside a launcher: run it in one local rank per device,
    keep rank 0's result."""
    devs = call["resolved"]
    data = model.adata
    if isinstance(data, _data.CSRStore):
        data = str(data.path)
    elif getattr(data, "isbacked", False):
        data = ("h5ad", str(data.filename))
    train_kwargs = {k: v for k, v in call.items()
                    if k not in ("max_restarts", "kwargs", "loader_kwargs", "split", "plan",
                                 "resolved", "device", "trainer_config", "plan_config")}
    train_kwargs |= {"strategy": "ddp", "accelerator": devs.device_type,
                     "devices": list(devs.ids) if devs.ids else devs.nproc,
                     "plan_kwargs": call["plan"] | (
                         {"compile": call["plan"]["compile_dense"]} if "compile_dense" in call["plan"]
                         else {}),
                     "datasplitter_kwargs": call["split"] or None}
    train_kwargs["plan_kwargs"].pop("compile_dense", None)
    payload = {
        "cls": type(model),  # pickled by name: each rank imports it
        "data": data, "registry": model.registry.to_dict(), "config": _io.config_of(model),
        "state": {k: v.detach().cpu() for k, v in model.module.state_dict().items()},
        "query": getattr(model, "query_flags_", None),
        "train": train_kwargs | call["loader_kwargs"],
    }
    results = _distributed.launch(ddp_train_worker, (payload,), nproc=devs.nproc,
                                  max_restarts=call["max_restarts"])
    res = results[0]
    model.module.load_state_dict(res["state"])
    model.module.eval()
    model.history_ = res["history"]
    model.train_indices, model.validation_indices = res["train_indices"], res["validation_indices"]
    model.test_indices = res["test_indices"]
    model.train_params_ = res["train_params"]
    model.trainer = SimpleNamespace(**res["trainer"])
    model.device = devs.device
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
    if payload.get("query") is not None:  # a query model trains what load_query_data chose
        model.query_flags_ = dict(payload["query"])
        set_online_update(model.module, **model.query_flags_)
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
        "test_indices": model.test_indices,
        "train_params": model.train_params_,
        "trainer": {
            "global_step": t.global_step, "epoch": t.epoch, "stopped_early": t.stopped_early,
            "train_time_s": t.train_time_s, "cells_trained": t.cells_trained,
            "epoch_times": list(t.epoch_times), "world_size": _distributed.env_world_size(),
        },
    }
