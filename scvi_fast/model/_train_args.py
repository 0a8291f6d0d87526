"""scvi-tools' ``train()`` arguments, read with scvi-tools' semantics.

scvi-tools passes ``accelerator``/``devices`` to Lightning, ``plan_kwargs`` to its
``TrainingPlan``, ``datasplitter_kwargs`` to its ``DataSplitter`` and everything else to
Lightning's ``Trainer``. scvi_fast has no Lightning: this module maps each of those arguments
onto scvi_fast's trainer, and names the ones it cannot honour. Arguments that would change
what is trained are refused with an error; ones that only concern logging or Lightning's
machinery are ignored with one warning that names them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

#: ``CSRLoader`` options ``train()`` passes on to its loaders
LOADER_KWARGS = ("block_size", "buffer_size", "prefetch", "emit_batches", "stage", "pin_memory",
                 "num_threads")

#: ``TrainingPlan`` arguments scvi_fast honours with scvi-tools' meaning (and its defaults)
PLAN_DEFAULTS = {
    "optimizer": "Adam", "lr": 1e-3, "weight_decay": 1e-6, "eps": 0.01,
    "n_steps_kl_warmup": None, "n_epochs_kl_warmup": 400, "max_kl_weight": 1.0,
    "min_kl_weight": 0.0, "reduce_lr_on_plateau": False, "lr_factor": 0.6, "lr_patience": 30,
    "lr_threshold": 0.0, "lr_scheduler_metric": "elbo_validation", "lr_min": 0.0,
    "compile": False, "compile_kwargs": None, "on_step": False, "on_epoch": True,
}
OPTIMIZERS = ("Adam", "AdamW")
VALIDATION_METRICS = ("elbo_validation", "reconstruction_loss_validation", "kl_local_validation")

#: Lightning ``Trainer`` arguments that only concern logging, checkpoint files or Lightning's
#: own machinery: ignored, with one warning
_IGNORED = ("logger", "log_every_n_steps", "enable_model_summary", "num_sanity_val_steps",
            "benchmark", "default_root_dir", "progress_bar_refresh_rate", "simple_progress_bar",
            "learning_rate_monitor", "log_save_dir", "deterministic", "profiler",
            "enable_checkpointing", "checkpointing_monitor", "reload_dataloaders_every_n_epochs",
            "use_distributed_sampler", "inference_mode", "detect_anomaly", "barebones",
            "limit_test_batches", "limit_predict_batches", "enable_autolog_hparams",
            "model_registry")
#: Lightning arguments that change what is trained, with the value that changes nothing
_REFUSED = {"gradient_clip_val": (None, 0, 0.0), "gradient_clip_algorithm": (None, "norm"),
            "accumulate_grad_batches": (1,), "max_steps": (-1, None), "min_epochs": (None,),
            "min_steps": (None,), "max_time": (None,), "limit_train_batches": (None, 1.0),
            "limit_val_batches": (None, 1.0), "val_check_interval": (None, 1.0),
            "overfit_batches": (0, 0.0), "fast_dev_run": (False,), "plugins": (None,),
            "sync_batchnorm": (False,), "num_nodes": (1,), "ckpt_path": (None,),
            "callbacks": (None,)}
#: ``DataLoader`` arguments scvi-tools' splitter forwards; scvi_fast's loader has no workers
_LOADER_IGNORED = ("num_workers", "persistent_workers", "prefetch_factor",
                   "multiprocessing_context", "timeout", "worker_init_fn", "generator")
#: precision spellings of Lightning -> scvi_fast's
_PRECISIONS = {"32": "32", 32: "32", "32-true": "32", "bf16-mixed": "bf16-mixed"}
_UNSUPPORTED_ACCELERATORS = ("mps", "tpu", "ipu", "hpu", "xla")


def merge_config(config, overrides, name: str) -> dict:
    """scvi-tools' ``merge_kwargs``: a mapping or an object with ``to_kwargs()``, then the
    overrides on top."""
    def coerce(value, what):
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        to_kwargs = getattr(value, "to_kwargs", None)
        if callable(to_kwargs):
            return dict(to_kwargs())
        raise TypeError(f"{what} must be a mapping or a config with to_kwargs()")
    return coerce(config, f"{name}_config") | coerce(overrides, name)


# ----------------------------------------------------------------------- devices --
@dataclass(frozen=True)
class Devices:
    """Where a training run goes: ``device_type`` ("cpu" or "cuda"), the CUDA ``ids`` (None on
    the CPU) and the number of processes (``nproc``; more than one is data-parallel)."""

    device_type: str
    ids: tuple[int, ...] | None
    nproc: int

    @property
    def device(self) -> torch.device:
        """The one device of a single-process run."""
        if self.device_type == "cuda":
            return torch.device("cuda", self.ids[0] if self.ids else 0)
        return torch.device("cpu")


def accelerator_type(accelerator) -> str:
    """``"cpu"`` or ``"cuda"`` for scvi-tools' ``accelerator`` ("auto": CUDA when present)."""
    if accelerator is None:
        accelerator = "auto"
    if not isinstance(accelerator, str):
        raise TypeError(f"accelerator must be a string ('auto', 'cpu', 'gpu' or 'cuda'); got "
                        f"{type(accelerator).__name__}")
    acc = accelerator.lower()
    if acc in _UNSUPPORTED_ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is not supported: scvi_fast trains on "
                         "CUDA GPUs and CPUs; use accelerator='gpu', 'cpu' or 'auto'")
    if acc == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if acc in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"accelerator={accelerator!r} was requested, but CUDA is not "
                               "available (torch.cuda.is_available() is False); use "
                               "accelerator='cpu' or 'auto'")
        return "cuda"
    if acc == "cpu":
        return "cpu"
    raise ValueError(f"unknown accelerator {accelerator!r}; use 'auto', 'cpu', 'gpu' or 'cuda'")


def _parse_devices(devices):
    """Lightning's ``devices``: "auto", a count (int or digit string), -1, or a list of ids
    (a list or a comma-separated string)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return "auto"
        if "," in text:
            return [int(p) for p in text.split(",") if p.strip()]
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"devices={devices!r} is neither 'auto', a number nor a list of "
                             "device ids") from None
    if isinstance(devices, bool) or devices is None:
        raise ValueError(f"devices={devices!r}: pass 'auto', a number or a list of device ids")
    if isinstance(devices, int):
        return devices
    ids = [int(d) for d in devices]
    if not ids:
        raise ValueError("devices is an empty list")
    return ids


def resolve_devices(accelerator="auto", devices="auto", device=None) -> Devices:
    """The devices of a run from scvi-tools' ``accelerator``/``devices`` and scvi_fast's
    ``device`` (a torch device string such as ``"cuda:1"``, which names one device).

    ``devices``: ``"auto"`` is one device (scvi-tools never spreads "auto" over several GPUs);
    an integer ``n`` is ``n`` processes (GPUs 0..n-1, or ``n`` CPU processes); ``-1`` every
    GPU; a list of ids those GPUs. Several devices train data-parallel (DDP).
    """
    parsed = _parse_devices(devices)
    if device is not None and not (isinstance(device, str) and device == "auto"):
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if accelerator not in (None, "auto") and accelerator_type(accelerator) != dev.type:
            raise ValueError(f"accelerator={accelerator!r} and device={device!r} disagree")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is not supported: scvi_fast trains on CUDA "
                             "GPUs and CPUs")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device={device!r} was requested, but CUDA is not available")
            if dev.index is not None:
                if parsed not in ("auto", 1):
                    raise ValueError(f"device={device!r} names one GPU; devices={devices!r} "
                                     "asks for others: pass devices=[ids] alone")
                return Devices("cuda", (dev.index,), 1)
        kind = dev.type
    else:
        kind = accelerator_type(accelerator)
    if kind == "cpu":
        if isinstance(parsed, list):
            raise ValueError(f"devices={devices!r} lists device ids, which mean GPUs; on the "
                             "CPU pass a number of processes")
        if parsed == -1:
            raise ValueError("devices=-1 means every GPU; on the CPU pass a number of processes")
        n = 1 if parsed == "auto" else int(parsed)
        if n < 1:
            raise ValueError(f"devices must be at least 1; got {devices!r}")
        return Devices("cpu", None, n)
    count = torch.cuda.device_count()
    if parsed == "auto":
        ids = [0]
    elif parsed == -1:
        ids = list(range(count))
    elif isinstance(parsed, int):
        if parsed < 1:
            raise ValueError(f"devices must be at least 1 (or -1 for every GPU); got {devices!r}")
        ids = list(range(parsed))
    else:
        ids = parsed
    if len(set(ids)) != len(ids):
        raise ValueError(f"devices={devices!r} lists a GPU twice")
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise ValueError(f"devices={devices!r}: GPU ids {bad} do not exist ({count} visible)")
    return Devices("cuda", tuple(ids), len(ids))


def resolve_single_device(accelerator="auto", device="auto") -> torch.device:
    """``load`` / ``load_query_data``'s ``accelerator``/``device`` (scvi-tools: one device;
    ``device`` is "auto", a GPU index, or a torch device string)."""
    if isinstance(device, (list, tuple)) or (isinstance(device, str) and "," in device):
        raise ValueError("Only a single device can be specified for `device`.")
    if isinstance(device, str) and device not in ("auto",) and not device.strip().isdigit():
        return resolve_devices(accelerator, "auto", device).device
    ids = "auto" if device == "auto" else [int(device)]
    kind = accelerator_type(accelerator)
    if kind == "cpu":
        return torch.device("cpu")
    return resolve_devices(accelerator, ids).device


def strategy_name(strategy) -> str:
    """``"auto"`` or ``"ddp"`` for a Lightning strategy (every ``"ddp*"`` spelling is DDP)."""
    if strategy is None:
        return "auto"
    if not isinstance(strategy, str):
        if "DDP" in type(strategy).__name__:
            return "ddp"
        raise ValueError(f"strategy {type(strategy).__name__} is not supported; use 'auto' or 'ddp'")
    if strategy in ("auto", "single_device"):
        return "auto"
    if strategy.startswith("ddp"):
        return "ddp"
    raise ValueError(f"strategy={strategy!r} is not supported: scvi_fast trains on one device or "
                     "data-parallel (strategy='ddp')")


# ------------------------------------------------------------- plan and trainer --
def check_plan(plan: dict) -> dict:
    """``plan_kwargs`` (merged with ``plan_config``) checked against scvi-tools' training plan:
    returns the given options (``compile`` as ``compile_dense``); unsupported options are
    refused by name."""
    plan = dict(plan)
    if plan.get("optimizer_creator") is not None or plan.get("optimizer") == "Custom":
        raise NotImplementedError(
            "plan_kwargs optimizer='Custom' / optimizer_creator is not supported: scvi_fast's "
            "step uses a fused, CUDA-graph capturable optimiser; choose optimizer='Adam' or 'AdamW'")
    plan.pop("optimizer_creator", None)
    if plan.pop("update_only_decoder", False):
        raise NotImplementedError("plan_kwargs update_only_decoder=True is not supported")
    unknown = sorted(set(plan) - set(PLAN_DEFAULTS))
    if unknown:
        # scvi-tools passes them on to module.loss, which takes none of them
        raise TypeError(f"unsupported plan_kwargs {unknown}: the training plan takes "
                        f"{sorted(PLAN_DEFAULTS)}")
    full = {**PLAN_DEFAULTS, **plan}
    if full["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"Optimizer not understood: {full['optimizer']!r} (use 'Adam' or 'AdamW')")
    if full["lr_scheduler_metric"] not in VALIDATION_METRICS:
        raise ValueError(f"lr_scheduler_metric must be one of {VALIDATION_METRICS}")
    if full["compile_kwargs"]:
        raise NotImplementedError(
            "plan_kwargs compile_kwargs is not supported: compile=True compiles scvi_fast's "
            "dense encoder and decoder stacks with torch.compile's defaults")
    quiet = []
    if full["on_step"]:
        quiet.append("on_step=True (metrics are logged per epoch)")
    if full["on_epoch"] is False:
        quiet.append("on_epoch=False (metrics are always logged per epoch)")
    if quiet:
        warnings.warn(f"scvi_fast ignores plan_kwargs {', '.join(quiet)}", UserWarning, stacklevel=4)
    for k in ("compile_kwargs", "on_step", "on_epoch"):
        plan.pop(k, None)
    if "compile" in plan:
        plan["compile_dense"] = bool(plan.pop("compile"))
    return plan


def loader_options(kwargs: dict) -> dict:
    """The loader options of ``train(**kwargs)``; the rest must be Lightning ``Trainer`` options.

    Loader options are :class:`~scvi_fast.data.CSRLoader`'s. Of Lightning's ``Trainer``
    options, those that change training raise one error naming them (unless they hold
    Lightning's neutral value), the others one warning; anything else is a ``TypeError``, as
    Lightning raises.
    """
    loader, refused, ignored, unknown = {}, [], [], []
    for k, v in kwargs.items():
        if k in LOADER_KWARGS:
            loader[k] = v
        elif k in _REFUSED:
            neutral = _REFUSED[k]
            if not (v in neutral or (k == "callbacks" and isinstance(v, (list, tuple)) and not v)):
                refused.append(f"{k}={v!r}")
        elif k in _IGNORED:
            ignored.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise TypeError(f"train() got unexpected keyword arguments {unknown}")
    if refused:
        raise NotImplementedError(
            f"scvi_fast does not support the Lightning Trainer arguments {', '.join(refused)}: "
            "they change what is trained, and scvi_fast's trainer is not Lightning's")
    if ignored:
        warnings.warn(f"scvi_fast trains without Lightning and ignores {', '.join(ignored)} "
                      "(history is in model.history; checkpoints: train(checkpoint_dir=...))",
                      UserWarning, stacklevel=4)
    return loader


def precision_name(precision) -> str:
    """Lightning's precision spelling as scvi_fast's (``"32"`` or ``"bf16-mixed"``)."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use '32' or 'bf16-mixed'")
    return _PRECISIONS[precision]


def datasplitter_options(kwargs: dict | None) -> tuple[dict, dict]:
    """``(splitter options, loader options)`` of ``datasplitter_kwargs``.

    Supported: ``external_indexing``, ``drop_last``, ``pin_memory`` and the loader options;
    ``DataLoader`` worker options are ignored (with a warning); the arguments ``train()``
    passes itself are refused, as scvi-tools' ``DataSplitter`` refuses them twice.
    """
    kwargs = dict(kwargs or {})
    clash = sorted(set(kwargs) & {"train_size", "validation_size", "shuffle_set_split",
                                  "load_sparse_tensor", "batch_size", "adata_manager"})
    if clash:
        raise TypeError(f"datasplitter_kwargs {clash} are train() arguments: pass them to train()")
    split_opts = {k: kwargs.pop(k) for k in ("external_indexing", "drop_last") if k in kwargs}
    ignored = [k for k in list(kwargs) if k in _LOADER_IGNORED]
    for k in ignored:
        kwargs.pop(k)
    if ignored:
        warnings.warn(f"scvi_fast's loader reads in its own threads; datasplitter_kwargs "
                      f"{ignored} are ignored", UserWarning, stacklevel=4)
    unknown = sorted(set(kwargs) - set(LOADER_KWARGS))
    if unknown:
        raise TypeError(f"unsupported datasplitter_kwargs {unknown}")
    return split_opts, kwargs
