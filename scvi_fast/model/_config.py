"""Defaults and presets of the architecture and of training: the one place the recipes live.

``MODEL_DEFAULTS`` and ``TRAIN_DEFAULTS`` are scvi-tools' defaults; ``PRESETS`` holds the CZ
CELLxGENE Census recipe. :func:`architecture` resolves a model's shape and
:meth:`TrainConfig.resolve` a training run's settings from them, the call and
``plan_kwargs``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from scvi_fast.module._generative import check_options

#: architecture and training defaults of the CZ CELLxGENE Census scVI recipe (the published
#: Census model has a negative-binomial likelihood)
PRESETS: dict[str, dict] = {
    "census": {
        "model": {"n_hidden": 512, "n_latent": 50, "n_layers": 2, "dropout_rate": 0.1,
                  "gene_likelihood": "nb"},
        "train": {"lr": 1e-4, "batch_size": 1024, "max_epochs": 100, "n_epochs_kl_warmup": 20},
    },
}
#: scvi-tools' defaults, used where neither the call nor a preset says otherwise
MODEL_DEFAULTS = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1,
                  "dispersion": "gene", "gene_likelihood": "zinb",
                  "latent_distribution": "normal", "use_observed_lib_size": True,
                  "encode_covariates": False, "deeply_inject_covariates": True}
TRAIN_DEFAULTS = {"lr": 1e-3, "batch_size": 128, "max_epochs": None, "n_epochs_kl_warmup": 400}
#: cells per minibatch when a model reads data for inference
INFERENCE_BATCH_SIZE = 1024


def check_preset(preset: str | None) -> None:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")


def architecture(preset: str | None = None, **given) -> dict:
    """``n_hidden``, ``n_latent``, ``n_layers``, ``dropout_rate``, the generative options
    (``dispersion``, ``gene_likelihood``, ``latent_distribution``, ``use_observed_lib_size``)
    and the covariate options (``encode_covariates``, ``deeply_inject_covariates``): the call's
    values where given (not None), else the preset's, else scvi-tools' defaults."""
    check_preset(preset)
    arch = dict(MODEL_DEFAULTS)
    if preset:
        arch.update(PRESETS[preset]["model"])
    unknown = sorted(set(given) - set(MODEL_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown architecture settings {unknown}; known: {sorted(MODEL_DEFAULTS)}")
    arch.update({k: v for k, v in given.items() if v is not None})
    for name, value in arch.items():
        if name in ARCH_BOUNDS:
            check_arch_value(name, value)
    check_options(arch["gene_likelihood"], arch["dispersion"], arch["latent_distribution"],
                  arch["use_observed_lib_size"])
    arch["use_observed_lib_size"] = bool(arch["use_observed_lib_size"])
    return arch


#: accepted range of each architecture setting: every allocation and loop that building a
#: model does is driven by these numbers (a saved config is checked before anything is built)
ARCH_BOUNDS = {
    "n_hidden": (1, 16384),
    "n_latent": (1, 1024),
    "n_layers": (1, 16),
    "dropout_rate": (0.0, 0.99),
}


def check_arch_value(name: str, value) -> None:
    """Raise a clear ``ValueError`` unless ``value`` is a valid ``name`` (type and range)."""
    if name not in ARCH_BOUNDS:  # the covariate switches
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {value!r}")
        return
    lo, hi = ARCH_BOUNDS[name]
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    is_num = is_int or isinstance(value, (float, np.floating))
    ok = (is_int if isinstance(lo, int) else is_num) and lo <= value <= hi
    if not ok:
        kind = "an integer" if isinstance(lo, int) else "a number"
        raise ValueError(f"{name} must be {kind} in [{lo}, {hi}]; got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The resolved settings of one training run (see :meth:`scvi_fast.SCVI.train`, whose
    signature holds scvi-tools' defaults of everything a preset does not set)."""

    max_epochs: int
    batch_size: int
    lr: float
    n_epochs_kl_warmup: int | None
    train_size: float | None
    validation_size: float | None
    seed: int
    weight_decay: float
    eps: float
    max_kl_weight: float
    min_kl_weight: float
    early_stopping: bool
    early_stopping_patience: int
    early_stopping_min_delta: float
    early_stopping_monitor: str
    checkpoint_dir: str | os.PathLike | None
    checkpoint_every_n_steps: int | None
    resume: bool
    progress_bar: bool
    allow_tf32: bool
    precision: str
    compile_dense: bool
    cuda_graph: bool | None
    optimizer: str = "Adam"
    n_steps_kl_warmup: int | None = None
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    check_val_every_n_epoch: int | None = None
    early_stopping_mode: str = "min"
    early_stopping_warmup_epochs: int = 0
    shuffle_set_split: bool = True
    drop_last: bool = False

    @classmethod
    def resolve(cls, preset: str | None, n_cells: int, *, max_epochs=None, batch_size=None,
                lr=None, n_epochs_kl_warmup=-1, plan: dict | None = None, **rest) -> TrainConfig:
        """Settings from the call, ``plan`` (checked ``plan_kwargs``, scvi-tools' spelling; it
        wins over the call's ``lr`` etc.), the preset and scvi-tools' defaults.

        ``n_epochs_kl_warmup=-1`` means "not given" (None is a valid value: no warm-up).
        ``max_epochs`` defaults to scvi-tools' heuristic ``max(min(round(20000 / n * 400),
        400), 1)`` unless the preset sets it. Validation runs every
        ``check_val_every_n_epoch`` epochs; None (scvi-tools' default) means never, unless
        early stopping or ``reduce_lr_on_plateau`` needs it (then every epoch).
        """
        check_preset(preset)
        defaults = dict(TRAIN_DEFAULTS)
        if preset:
            defaults.update(PRESETS[preset]["train"])
        plan = dict(plan or {})
        if n_epochs_kl_warmup == -1:
            n_epochs_kl_warmup = defaults["n_epochs_kl_warmup"]
        if max_epochs is None:
            max_epochs = defaults["max_epochs"] or max_epochs_heuristic(n_cells)
        rest.update(max_epochs=int(max_epochs), batch_size=int(batch_size or defaults["batch_size"]),
                    lr=defaults["lr"] if lr is None else lr, n_epochs_kl_warmup=n_epochs_kl_warmup)
        for k in ("compile", "compile_kwargs", "on_step", "on_epoch"):
            plan.pop(k, None)  # mapped by the caller (compile -> compile_dense) or logging only
        rest.update(plan)
        if rest.get("check_val_every_n_epoch") is None and (
                rest.get("early_stopping") or rest.get("reduce_lr_on_plateau")):
            rest["check_val_every_n_epoch"] = 1
        return cls(**rest)

    def trainer_kwargs(self) -> dict:
        """The :class:`scvi_fast.train.Trainer` arguments these settings give."""
        d = asdict(self)
        for k in ("max_epochs", "batch_size", "train_size", "validation_size", "resume",
                  "cuda_graph", "eps", "shuffle_set_split", "drop_last"):
            d.pop(k)
        return d | {"adam_eps": self.eps, "step_mode": step_mode(self.cuda_graph)}

    def summary(self) -> dict:
        """What a model records of its last run (``train_params_``)."""
        d = asdict(self)
        return {k: d[k] for k in ("max_epochs", "batch_size", "lr", "n_epochs_kl_warmup",
                                  "n_steps_kl_warmup", "train_size", "validation_size",
                                  "check_val_every_n_epoch", "optimizer", "seed")}


def max_epochs_heuristic(n_cells: int, epochs_cap: int = 400, decay_at_n_obs: int = 20_000) -> int:
    """scvi-tools' ``get_max_epochs_heuristic``: 400 epochs up to 20,000 cells, then fewer."""
    n = max(min(round((decay_at_n_obs / max(n_cells, 1)) * epochs_cap), epochs_cap), 1)
    if n == 1:
        warnings.warn("The default number of maximum epochs has been set to 1 due to the large "
                      "number of observations. Pass in `max_epochs` to the `train` function in "
                      "order to override this behavior.", UserWarning, stacklevel=4)
    return n


def step_mode(cuda_graph) -> str:
    """The trainer's step mode for ``train(cuda_graph=...)``."""
    modes = {None: "auto", True: "graph", False: "eager"}
    if not (cuda_graph is None or isinstance(cuda_graph, bool)):
        raise ValueError(f"cuda_graph must be None, True or False; got {cuda_graph!r}")
    return modes[cuda_graph]


def prefetch_default(device: torch.device) -> bool:
    """Whether minibatches are gathered on a background thread by default.

    Yes when the model runs on a GPU (the host is otherwise idle during a step) or when the
    CPU has cores that torch's compute threads leave free. When torch already uses every
    core, a reader thread only takes cycles from the step (and makes its OpenMP workers
    wait for each other): on a 2-core machine at the Census preset, training was about 4%
    faster gathering each minibatch in the main thread (1.4 ms per 1024 cells).
    """
    if torch.device(device).type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()
