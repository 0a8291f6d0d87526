"""The user-facing scVI model, shaped like ``scvi.model.SCVI``.

Switching from scvi-tools is an import change::

    import scvi_fast
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi_fast.SCVI(adata)
    model.train()
    adata.obsm["X_scVI"] = model.get_latent_representation()
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from scvi_fast import data as _data
from scvi_fast.module import VAE
from scvi_fast.train import Trainer, resolve_device
from scvi_fast.train import _distributed

SETUP_KEY = "_scvi_fast_setup"
FORMAT_VERSION = 1

#: architecture and training defaults of the CZ CELLxGENE Census scVI recipe
PRESETS: dict[str, dict] = {
    "census": {
        "model": {"n_hidden": 512, "n_latent": 50, "n_layers": 2, "dropout_rate": 0.1},
        "train": {"lr": 1e-4, "batch_size": 1024, "max_epochs": 100, "n_epochs_kl_warmup": 20},
    },
}
#: scvi-tools' defaults, used where neither the call nor a preset says otherwise
MODEL_DEFAULTS = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1}
TRAIN_DEFAULTS = {"lr": 1e-3, "batch_size": 128, "max_epochs": None, "n_epochs_kl_warmup": 400}
INFERENCE_BATCH_SIZE = 1024


def _prefetch_default(device: torch.device) -> bool:
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


def _step_mode(cuda_graph) -> str:
    """The trainer's step mode for ``train(cuda_graph=...)``."""
    modes = {None: "auto", True: "graph", False: "eager"}
    if not (cuda_graph is None or isinstance(cuda_graph, bool)):
        raise ValueError(f"cuda_graph must be None, True or False; got {cuda_graph!r}")
    return modes[cuda_graph]


def _categories(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes and category names, the way scvi-tools categorises a column."""
    cat = values if isinstance(values.dtype, pd.CategoricalDtype) else values.astype("category")
    if cat.isna().any():
        raise ValueError(
            f"column {values.name!r} has {int(cat.isna().sum())} missing values; fill them "
            "(e.g. adata.obs[key] = adata.obs[key].astype(str)) before setup"
        )
    cat = cat.cat.remove_unused_categories()
    return cat.cat.codes.to_numpy().astype(np.int64), [str(c) for c in cat.cat.categories]


def _map_codes(values: pd.Series, categories: list[str], key: str) -> np.ndarray:
    """Codes of ``values`` in a model's known ``categories``; unknown ones are an error."""
    lookup = {c: i for i, c in enumerate(categories)}
    as_str = values.astype(str).to_numpy()
    codes = np.fromiter((lookup.get(v, -1) for v in as_str), dtype=np.int64, count=len(as_str))
    if (codes < 0).any():
        unknown = sorted(set(as_str[codes < 0]))
        raise ValueError(
            f"adata.obs[{key!r}] has categories the model was not trained on: "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}. Known: {categories[:10]}"
            f"{' ...' if len(categories) > 10 else ''}. Map query batches with "
            "SCVI.load_query_data, or subset to known categories."
        )
    return codes


class SCVI:
    """scVI (Lopez et al. 2018) with a negative-binomial likelihood, on fused kernels.

    Parameters
    ----------
    adata
        An AnnData registered with :meth:`setup_anndata`, a CSR store opened with
        :meth:`setup_store` (or its path), or None when loading weights.
    n_hidden, n_latent, n_layers, dropout_rate
        Architecture; scvi-tools' defaults 128 / 10 / 1 / 0.1.
    dispersion, gene_likelihood, latent_distribution
        Only scvi-tools' defaults ``"gene"``, ``"nb"`` and ``"normal"`` are supported.
    preset
        ``"census"``: the CZ CELLxGENE Census recipe (512 / 50 / 2; ``train`` then
        defaults to lr 1e-4, batch 1024, 100 epochs, 20 warm-up epochs).
    impl
        Back-end of the fused ops: ``"auto" | "triton" | "native" | "torch"``.
    seed
        Seed of the weight initialisation.
    """

    def __init__(
        self,
        adata=None,
        n_hidden: int | None = None,
        n_latent: int | None = None,
        n_layers: int | None = None,
        dropout_rate: float | None = None,
        dispersion: Literal["gene"] = "gene",
        gene_likelihood: Literal["nb"] = "nb",
        latent_distribution: Literal["normal"] = "normal",
        preset: Literal["census"] | None = None,
        impl: Literal["auto", "triton", "native", "torch"] = "auto",
        seed: int = 0,
        *,
        _registry: dict | None = None,
    ):
        if dispersion != "gene" or gene_likelihood != "nb" or latent_distribution != "normal":
            raise NotImplementedError(
                "scvi_fast implements scVI with dispersion='gene', gene_likelihood='nb' and "
                "latent_distribution='normal'; use scvi-tools for other variants"
            )
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        self.preset = preset
        arch = dict(MODEL_DEFAULTS)
        if preset:
            arch.update(PRESETS[preset]["model"])
        for k, v in dict(
            n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate
        ).items():
            if v is not None:
                arch[k] = v
        if _registry is not None:
            self.registry = _registry
        elif adata is None:
            raise ValueError("pass an AnnData registered with SCVI.setup_anndata, or a store")
        else:
            self.registry = self._registry_of(adata)
        self.adata = adata
        # Weights are initialised from their own seeded stream so that a model
        # (and a CPU training run) is reproducible without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = VAE(
                n_input=len(self.registry["var_names"]),
                n_batch=len(self.registry["batch_categories"]),
                n_labels=len(self.registry["labels_categories"]),
                impl=impl,
                **arch,
            )
        self.init_params_ = {**arch, "preset": preset, "impl": impl}
        self.is_trained_ = False
        self.history_: dict[str, list[float]] = {}
        self.train_indices = self.validation_indices = None
        #: scvi-tools tensors scvi_fast never computes with, kept for export
        self._passthrough: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ setup --
    @classmethod
    def setup_anndata(
        cls,
        adata,
        batch_key: str | None = None,
        labels_key: str | None = None,
        layer: str | None = None,
    ) -> None:
        """Register an AnnData: which counts to model and which obs columns are covariates.

        Validates that the counts are non-negative integers with no NaN/Inf and no
        empty cells, before any training starts.
        """
        for key, what in ((batch_key, "batch_key"), (labels_key, "labels_key")):
            if key is not None and key not in adata.obs:
                raise KeyError(
                    f"{what}={key!r} is not a column of adata.obs; available: "
                    f"{list(adata.obs.columns)[:20]}"
                )
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"layer={layer!r} is not in adata.layers: {list(adata.layers)}")
        if batch_key is not None:
            _, batch_cats = _categories(adata.obs[batch_key])
        else:
            batch_cats = ["0"]
        if labels_key is not None:
            _, label_cats = _categories(adata.obs[labels_key])
        else:
            label_cats = ["0"]
        _data.check_counts(adata, layer=layer)
        adata.uns[SETUP_KEY] = {
            "batch_key": batch_key or "",
            "labels_key": labels_key or "",
            "layer": layer or "",
            "batch_categories": list(batch_cats),
            "labels_categories": list(label_cats),
        }

    @classmethod
    def setup_store(cls, path: str | os.PathLike):
        """Open (and validate) a CSR store written by ``scvi_fast.data.CSRStore.create``.

        The store carries its batch and label codes; the returned store is what
        ``SCVI(store)`` takes.
        """
        return _data.CSRStore.open(path)

    @staticmethod
    def _registry_of(adata) -> dict:
        if isinstance(adata, (str, os.PathLike)):
            adata = _data.CSRStore.open(adata)
        if isinstance(adata, _data.CSRStore):
            return {
                "source": "store",
                "batch_key": adata.batch_key or "",
                "labels_key": adata.labels_key or "",
                "layer": "",
                "batch_categories": list(adata.batch_categories or ["0"]),
                "labels_categories": list(adata.labels_categories or ["0"]),
                "var_names": [str(v) for v in adata.var_names],
            }
        if SETUP_KEY not in adata.uns:
            raise ValueError(
                "this AnnData is not set up: call scvi_fast.SCVI.setup_anndata(adata, "
                "batch_key=...) first"
            )
        setup = adata.uns[SETUP_KEY]
        return {
            "source": "anndata",
            "batch_key": str(setup["batch_key"]),
            "labels_key": str(setup["labels_key"]),
            "layer": str(setup["layer"]),
            "batch_categories": [str(c) for c in setup["batch_categories"]],
            "labels_categories": [str(c) for c in setup["labels_categories"]],
            "var_names": [str(v) for v in adata.var_names],
        }

    @property
    def var_names(self) -> pd.Index:
        return pd.Index(self.registry["var_names"])

    @property
    def batch_categories(self) -> list[str]:
        return list(self.registry["batch_categories"])

    @property
    def is_trained(self) -> bool:
        return self.is_trained_

    @property
    def summary_string(self) -> str:
        a = self.init_params_
        return (
            f"SCVI model with n_hidden={a['n_hidden']}, n_latent={a['n_latent']}, "
            f"n_layers={a['n_layers']}, dropout_rate={a['dropout_rate']}, "
            f"{len(self.registry['var_names'])} genes, "
            f"{len(self.registry['batch_categories'])} batch categories; "
            f"trained: {self.is_trained_}"
        )

    def __repr__(self) -> str:
        return self.summary_string

    # ------------------------------------------------------------ data access --
    def _source(self, adata=None):
        """A row source for ``adata`` (default: the training data) with the model's codes.

        A new AnnData must have the model's genes in the model's order and known
        batch categories; its setup is transferred from the model.
        """
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("this model holds no data; pass adata=...")
        if isinstance(adata, (str, os.PathLike)):
            adata = _data.CSRStore.open(adata)
        reg = self.registry
        if isinstance(adata, _data.CSRStore):
            self._check_genes(adata.var_names)
            batch = self._store_codes(adata, "batch")
            labels = self._store_codes(adata, "labels")
            return _data.as_source(adata, batch_codes=batch, labels_codes=labels)
        self._check_genes(adata.var_names)
        obs = adata.obs
        if reg["batch_key"]:
            if reg["batch_key"] not in obs:
                raise KeyError(
                    f"the model was trained with batch_key={reg['batch_key']!r}, which is not "
                    "a column of adata.obs"
                )
            batch = _map_codes(obs[reg["batch_key"]], reg["batch_categories"], reg["batch_key"])
        else:
            batch = np.zeros(adata.n_obs, dtype=np.int64)
        if reg["labels_key"] and reg["labels_key"] in obs:
            labels = _map_codes(obs[reg["labels_key"]], reg["labels_categories"], reg["labels_key"])
        else:
            labels = np.zeros(adata.n_obs, dtype=np.int64)
        layer = reg["layer"] or None
        if adata is not self.adata and not getattr(adata, "isbacked", False):
            _data.check_counts(adata, layer=layer)
        return _data.as_source(adata, layer=layer, batch_codes=batch, labels_codes=labels)

    def _store_codes(self, store, which: str) -> np.ndarray | None:
        cats = store.batch_categories if which == "batch" else store.labels_categories
        model_cats = self.registry[f"{which}_categories"]
        codes = store.batch_codes if which == "batch" else store.labels_codes
        if not cats or list(cats) == list(model_cats):
            return None
        lookup = {c: i for i, c in enumerate(model_cats)}
        remap = np.array([lookup.get(str(c), -1) for c in cats], dtype=np.int64)
        if which == "batch" and (remap < 0).any():
            raise ValueError(
                f"the store has batch categories the model was not trained on: "
                f"{[c for c, r in zip(cats, remap) if r < 0][:10]}"
            )
        return np.where(remap[np.asarray(codes)] < 0, 0, remap[np.asarray(codes)])

    def _check_genes(self, var_names) -> None:
        mine = self.registry["var_names"]
        theirs = [str(v) for v in var_names]
        if theirs == mine:
            return
        shared = len(set(theirs) & set(mine))
        raise ValueError(
            f"the data's genes differ from the model's: {len(theirs)} genes given, "
            f"{len(mine)} in the model, {shared} in common"
            + (" (same genes, different order)" if shared == len(mine) == len(theirs) else "")
            + ". Reorder/subset with adata[:, model.var_names] or "
            "SCVI.prepare_query_anndata(adata, model)."
        )

    def _loader(self, source, indices=None, batch_size=None, shuffle=False, seed=0, drop_last=False,
                pin_memory=False):
        return _data.CSRLoader(
            source,
            batch_size=batch_size or INFERENCE_BATCH_SIZE,
            shuffle=shuffle,
            seed=seed,
            indices=None if indices is None else np.asarray(indices, dtype=np.int64),
            drop_last=drop_last,
            prefetch=_prefetch_default(self.device),
            pin_memory=pin_memory,
        )

    # --------------------------------------------------------------- training --
    def _split(self, n: int, train_size: float, validation_size: float | None, batch_size: int, seed: int,
               world_size: int = 1):
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1]; got {train_size}")
        n_train = math.ceil(train_size * n)
        if validation_size is None:
            n_val = n - n_train
        else:
            if not 0.0 <= validation_size < 1.0 or train_size + validation_size > 1.0:
                raise ValueError("validation_size must be in [0, 1) with train_size + validation_size <= 1")
            n_val = math.floor(n * validation_size)
        # Data-parallel: every rank the same number of cells, so that each training cell is
        # seen exactly once per epoch (no wrap-around padding).
        n_val, n_train = n_val + n_train % world_size, n_train - n_train % world_size
        # BatchNorm cannot train on a final minibatch of one or two cells: move
        # them to validation as scvi-tools does (on every rank).
        rest = (n_train // world_size) % batch_size
        if 0 < rest < 3 and n_train > rest * world_size:
            n_train -= rest * world_size
            n_val += rest * world_size
        perm = np.random.RandomState(seed=seed).permutation(n)
        return np.sort(perm[n_val : n_val + n_train]), np.sort(perm[:n_val])

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        n_epochs_kl_warmup: int | None = -1,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_min_delta: float = 0.0,
        early_stopping_monitor: str = "elbo_validation",
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        max_kl_weight: float = 1.0,
        min_kl_weight: float = 0.0,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int | None = None,
        resume: bool = False,
        seed: int = 0,
        device: str = "auto",
        accelerator: str | None = None,
        progress_bar: bool = True,
        plan_kwargs: dict | None = None,
        allow_tf32: bool = False,
        precision: Literal["32", "bf16-mixed"] = "32",
        compile_dense: bool = False,
        cuda_graph: bool | None = None,
        strategy: Literal["auto", "ddp"] = "auto",
        devices: int | Literal["auto"] = "auto",
        max_restarts: int = 0,
        **loader_kwargs,
    ) -> SCVI:
        """Train the model (scvi-tools' defaults unless a preset says otherwise).

        Parameters
        ----------
        max_epochs
            Default: scvi-tools' heuristic ``min(round(20000 / n_cells * 400), 400)``
            (100 for the census preset).
        batch_size, lr, n_epochs_kl_warmup
            Minibatch size (128), Adam learning rate (1e-3), KL warm-up epochs (400);
            ``plan_kwargs={"lr": ...}`` is accepted as in scvi-tools.
        train_size, validation_size
            Fractions of cells for training and validation (90/10 by default), split
            with a ``np.random.RandomState(seed)`` permutation.
        early_stopping, early_stopping_patience, early_stopping_min_delta, early_stopping_monitor
            As scvi-tools (monitors ``elbo_validation``).
        weight_decay, eps
            Adam's weight decay (1e-6) and epsilon (0.01).
        checkpoint_dir, checkpoint_every_n_steps, resume
            Write ``checkpoint.pt`` atomically each epoch (and every n steps); with
            ``resume=True`` continue an interrupted run from it.
        seed
            Seeds the split, the shuffling and torch's sampling noise.
        device
            ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda[:i]"``.
        allow_tf32, precision, compile_dense
            CUDA speed options (TF32 GEMMs; ``"bf16-mixed"`` autocast of the GEMMs with the
            likelihood in fp32; ``torch.compile`` of the dense stacks). Off by default, and
            ignored on the CPU.
        cuda_graph
            On CUDA the whole training step (forward, backward, Adam) and the validation step
            are captured as CUDA graphs and replayed, with the minibatch copied into static
            device buffers ahead of each step: ``None`` (default) does so on a single CUDA
            device (not with DDP or ``compile_dense``), ``True`` requires it, ``False`` runs
            every step eagerly (for debugging). Same arithmetic either way.
        strategy, devices, max_restarts
            ``"ddp"``: data-parallel training (``DistributedDataParallel``), one process per
            GPU (NCCL) or per CPU share (gloo). Under ``torchrun`` every rank calls ``train``
            and trains its shard of each epoch (``"auto"`` becomes ``"ddp"`` there, and
            with ``devices > 1``);
            elsewhere ``devices`` local ranks (``"auto"``: every visible GPU) are launched
            through torch's elastic launcher, restarted up to ``max_restarts`` times after a
            failure (with ``resume=True`` each restart continues from the checkpoint), and
            the trained weights come back to this object. ``batch_size`` is per rank: the
            global minibatch is ``batch_size * world_size``. See ``scvi_fast.train._distributed``
            for the BatchNorm choice (local, running statistics averaged over ranks).
        **loader_kwargs
            Passed to :class:`scvi_fast.data.CSRLoader` (``block_size``, ``buffer_size``,
            ``prefetch``...).
        """
        call = dict(locals())
        if strategy not in ("auto", "ddp"):
            raise ValueError(f"strategy must be 'auto' or 'ddp'; got {strategy!r}")
        if strategy == "auto" and (_distributed.env_world_size() > 1
                                   or (isinstance(devices, int) and devices > 1)):
            strategy = "ddp"
        if strategy == "ddp" and not _distributed.launched():
            return self._train_launched(call)
        ctx = _distributed.setup(accelerator or device) if strategy == "ddp" else None
        rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        plan_kwargs = dict(plan_kwargs or {})
        defaults = dict(TRAIN_DEFAULTS)
        if self.preset:
            defaults.update(PRESETS[self.preset]["train"])
        lr = plan_kwargs.pop("lr", lr if lr is not None else defaults["lr"])
        if n_epochs_kl_warmup == -1:
            n_epochs_kl_warmup = plan_kwargs.pop("n_epochs_kl_warmup", defaults["n_epochs_kl_warmup"])
        weight_decay = plan_kwargs.pop("weight_decay", weight_decay)
        eps = plan_kwargs.pop("eps", eps)
        max_kl_weight = plan_kwargs.pop("max_kl_weight", max_kl_weight)
        min_kl_weight = plan_kwargs.pop("min_kl_weight", min_kl_weight)
        if plan_kwargs:
            raise TypeError(f"unsupported plan_kwargs: {sorted(plan_kwargs)}")
        batch_size = batch_size or defaults["batch_size"]
        source = self._source()
        n = source.n_cells
        if max_epochs is None:
            max_epochs = defaults["max_epochs"] or min(round((20000 / n) * 400), 400)
        train_idx, val_idx = self._split(n, train_size, validation_size, batch_size, seed, world_size)
        self.train_indices, self.validation_indices = train_idx, val_idx
        self.device = resolve_device(accelerator if accelerator not in (None, "auto") else device)
        if ctx is not None:
            self.device = ctx.device
        loader_kwargs.setdefault("prefetch", _prefetch_default(self.device))
        loader_kwargs.setdefault("pin_memory", self.device.type == "cuda")
        train_loader = _data.CSRLoader(
            source, batch_size=batch_size, shuffle=True, seed=seed, indices=train_idx,
            drop_last=False, rank=rank, world_size=world_size, **loader_kwargs,
        )
        val_loader = (
            _data.CSRLoader(source, batch_size=max(batch_size, INFERENCE_BATCH_SIZE), shuffle=False,
                            indices=np.array_split(val_idx, world_size)[rank], **loader_kwargs)
            if len(val_idx) else None
        )
        self.trainer = None  # a previous run's DDP wrapper releases its gradient hooks first
        trainer = Trainer(
            self.module, train_loader, val_loader,
            lr=lr, weight_decay=weight_decay, adam_eps=eps,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            max_kl_weight=max_kl_weight, min_kl_weight=min_kl_weight,
            early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            early_stopping_min_delta=early_stopping_min_delta,
            early_stopping_monitor=early_stopping_monitor,
            checkpoint_dir=checkpoint_dir, checkpoint_every_n_steps=checkpoint_every_n_steps,
            device=self.device, seed=seed, progress_bar=progress_bar,
            allow_tf32=allow_tf32, precision=precision, compile_dense=compile_dense,
            step_mode=_step_mode(cuda_graph),
            distributed=ctx,
        )
        self.trainer = trainer
        self.history_ = trainer.fit(max_epochs, resume=resume)
        self.module.eval()
        self.is_trained_ = True
        self.train_params_ = {
            "max_epochs": max_epochs, "batch_size": batch_size, "lr": lr,
            "n_epochs_kl_warmup": n_epochs_kl_warmup, "train_size": train_size, "seed": seed,
        }
        return self

    def _train_launched(self, call: dict) -> SCVI:
        """``train(strategy="ddp")`` outside a launcher: run it in local ranks, keep rank 0's result."""
        from types import SimpleNamespace

        dev = call["accelerator"] or call["device"]
        on_cuda = torch.cuda.is_available() and str(dev) in ("auto", "gpu") or str(dev).startswith("cuda")
        nproc = call["devices"]
        if nproc == "auto":
            nproc = torch.cuda.device_count() if on_cuda else 1
        data = self.adata
        if isinstance(data, _data.CSRStore):
            data = str(data.path)
        elif getattr(data, "isbacked", False):
            data = ("h5ad", str(data.filename))
        train_kwargs = {k: v for k, v in call.items()
                        if k not in ("self", "devices", "max_restarts", "loader_kwargs")}
        train_kwargs["strategy"] = "ddp"
        payload = {
            "data": data, "registry": self.registry, "init": self.init_params_,
            "state": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "train": train_kwargs | call["loader_kwargs"],
        }
        results = _distributed.launch(_ddp_train_worker, (payload,), nproc=int(nproc),
                                      max_restarts=call["max_restarts"])
        res = results[0]
        self.module.load_state_dict(res["state"])
        self.module.eval()
        self.history_ = res["history"]
        self.train_indices, self.validation_indices = res["train_indices"], res["validation_indices"]
        self.train_params_ = res["train_params"]
        self.trainer = SimpleNamespace(**res["trainer"])
        self.device = resolve_device("cuda" if on_cuda else "cpu")
        self.is_trained_ = True
        return self

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: ``{name: DataFrame indexed by epoch}``."""
        return {
            k: pd.DataFrame({k: v}, index=pd.Index(np.arange(len(v)), name="epoch"))
            for k, v in self.history_.items()
        }

    # -------------------------------------------------------------- inference --
    def _iter(self, adata=None, indices=None, batch_size=None):
        source = self._source(adata)
        loader = self._loader(source, indices=indices, batch_size=batch_size)
        self.module.to(self.device).eval()
        for mb in loader:
            yield mb, mb.to(self.device, non_blocking=True)

    def get_latent_representation(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        out: str | os.PathLike | None = None,
        progress_bar: bool = False,
        precision: Literal["32", "bf16-mixed"] = "32",
    ):
        """Posterior mean (or a sample) of ``z`` for each cell, ``(n_cells, n_latent)``.

        Streams minibatches through the encoder only, so an in-memory AnnData, a backed
        ``.h5ad`` or a CSR store of any size can be embedded. On a GPU, reading, computing and
        writing overlap (see :mod:`scvi_fast.analysis._latent`).

        Parameters
        ----------
        give_mean
            Posterior mean (default) or one sample of ``z``.
        batch_size
            Cells per minibatch; default 16384 on a GPU, 1024 on the CPU.
        return_dist
            Return ``(q_m, q_v)``, the posterior mean and variance.
        out
            Path of a ``.npy`` file to write the embedding into, block by block (host memory
            stays bounded by a few minibatches, whatever the number of cells); the file is
            returned opened read-only as a memory map.
        progress_bar
            Show cells/s while embedding.
        precision
            ``"32"`` (default) or ``"bf16-mixed"``: CUDA only, run the encoder's GEMMs under
            bfloat16 autocast (faster; the embedding differs from fp32 by bfloat16 rounding);
            ignored on the CPU, like ``train(precision=...)``.

        Under a distributed job (``torchrun``, after ``train(strategy="ddp")``) this is a
        collective, called on every rank: each rank embeds a contiguous share of the cells;
        with ``out`` (on a filesystem all ranks see) the ranks write their own row ranges of
        the file, otherwise the shares are gathered and every rank gets the whole array.
        """
        from scvi_fast.analysis import default_batch_size, in_order_batches, latent_representation

        batch_size = batch_size or default_batch_size(self.device)
        ctx = _distributed.active()
        if ctx is not None:
            return self._latent_distributed(ctx, adata, indices, give_mean, batch_size, return_dist,
                                            out, precision)
        if out is not None and return_dist:
            raise ValueError("return_dist=True cannot be combined with out=")
        source = self._source(adata)
        n = source.n_cells if indices is None else len(indices)
        batches = in_order_batches(source, batch_size) if indices is None else None
        if batches is None:
            # on a GPU the loader gathers into pinned memory, copied from without staging
            batches = self._loader(source, indices=indices, batch_size=batch_size,
                                   pin_memory=self.device.type == "cuda")
        return latent_representation(
            self.module, batches, n, self.device, give_mean=give_mean, return_dist=return_dist,
            out=out, precision=precision, progress_bar=progress_bar,
        )

    def _latent_distributed(self, ctx, adata, indices, give_mean, batch_size, return_dist, out,
                            precision="32"):
        from scvi_fast.analysis import latent_fn

        source = self._source(adata)
        rows = np.arange(source.n_cells) if indices is None else np.asarray(indices, dtype=np.int64)
        Z = self.module.n_latent
        self.module.to(self.device).eval()
        with torch.inference_mode():
            res = _distributed.map_rows(
                latent_fn(self.module, give_mean=give_mean, return_dist=return_dist,
                          precision=precision),
                lambda idx: self._loader(source, indices=idx, batch_size=batch_size), rows,
                2 * Z if return_dist else Z, self.device, ctx=ctx, out=out,
            )
        return (res[:, :Z], res[:, Z:]) if return_dist else res

    def _batch_codes_of(self, transform_batch) -> list[int | None]:
        if transform_batch is None:
            return [None]
        items = transform_batch if isinstance(transform_batch, (list, tuple)) else [transform_batch]
        cats = self.registry["batch_categories"]
        out = []
        for b in items:
            if str(b) in cats:
                out.append(cats.index(str(b)))
            elif isinstance(b, (int, np.integer)) and 0 <= b < len(cats):
                out.append(int(b))
            else:
                raise ValueError(f"transform_batch {b!r} is not a batch category: {cats[:10]}")
        return out

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ):
        """Normalised (denoised, optionally batch-corrected) expression.

        Parameters
        ----------
        transform_batch
            A batch category (or list of categories, averaged) to decode every cell
            in; None keeps each cell's own batch.
        gene_list
            Subset of genes to return.
        library_size
            Scale the normalised expression to this library size, or ``"latent"`` for
            the cell's observed library (the NB mean).
        n_samples, return_mean
            Posterior samples of ``z``; averaged when ``return_mean``.

        Returns
        -------
        A DataFrame (cells x genes) when a single 2-D result is asked for, else a
        numpy array of shape ``(n_samples, n_cells, n_genes)``.
        """
        if n_samples > 1 and not return_mean:
            return_numpy = True
        genes = self.var_names
        if gene_list is None:
            gene_idx = slice(None)
            out_genes = genes
        else:
            missing = [g for g in gene_list if g not in set(genes)]
            if missing:
                raise KeyError(f"genes not in the model: {missing[:10]}")
            gene_idx = torch.as_tensor(genes.get_indexer(list(gene_list)))
            out_genes = pd.Index(list(gene_list))
        from scvi_fast.analysis import normalized_expression

        codes = self._batch_codes_of(transform_batch)
        # written into one preallocated array; decoding runs in bounded chunks
        result, obs_idx = normalized_expression(
            self.module, self._iter(adata, indices, batch_size), self._n_rows(adata, indices),
            transform_codes=codes, gene_idx=None if isinstance(gene_idx, slice) else gene_idx.numpy(),
            library_size=library_size, n_samples=n_samples, return_mean=return_mean,
        )
        if return_numpy:
            return result
        src_adata = self.adata if adata is None else adata
        names = getattr(src_adata, "obs_names", None)
        index = pd.Index(np.asarray(names)[obs_idx]) if names is not None else None
        return pd.DataFrame(result, index=index, columns=out_genes)

    def _n_rows(self, adata=None, indices=None) -> int:
        """Number of cells ``_iter(adata, indices)`` yields."""
        if indices is not None:
            return len(np.asarray(indices).reshape(-1))
        data = self.adata if adata is None else adata
        if isinstance(data, (str, os.PathLike)):
            data = _data.CSRStore.open(data)
        return int(data.n_cells if isinstance(data, _data.CSRStore) else data.n_obs)

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: Sequence[int] | Sequence[bool] | str | None = None,
        idx2: Sequence[int] | Sequence[bool] | str | None = None,
        mode: Literal["vanilla", "change"] = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        weights: Literal["uniform"] | None = "uniform",
        filter_outlier_cells: bool = False,
        n_samples: int | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression, with scvi-tools' modes, defaults and columns.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the training data).
        groupby, group1, group2
            An ``adata.obs`` column; ``group1`` one or several of its values (default: each
            value in turn); ``group2`` the reference (default: all other cells, "Rest").
        idx1, idx2
            Instead of groups: boolean masks, integer indices or ``adata.obs.query`` strings.
        mode
            ``"vanilla"`` (Bayes factor of ``rho1 > rho2``, sorted by ``bayes_factor``) or
            ``"change"`` (LFC posterior, ``proba_de = P(|LFC| > delta)``, sorted by
            ``proba_de``, with ``is_de_fdr_<fdr_target>``).
        delta
            LFC threshold of the change mode (None: estimated from the LFC means).
        batch_correction, batchid1, batchid2
            Decode both groups in every batch category (or the ``batchid`` lists) and pair
            samples within a batch, instead of in the cells' own batches.
        n_samples
            Posterior samples of ``rho`` per group (scvi-tools' ``n_samples_overall``,
            default 5000), split evenly over the decoding batches.
        seed
            Seeds the sampling for a reproducible table (None: fresh randomness).
        **kwargs
            scvi-tools' ``get_bayes_factors`` options: ``n_samples_overall``,
            ``pseudocounts``, ``threshold_counts``, ``test_mode``, ``use_permutation``,
            ``m_permutation``, ``change_fn``, ``m1_domain_fn``, ``cred_interval_lvls``.

        Returns
        -------
        A DataFrame indexed by gene name. Change mode: ``proba_de``, ``proba_not_de``,
        ``bayes_factor``, ``scale1``, ``scale2``, ``pseudocounts``, ``delta``, ``lfc_mean``,
        ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max``; vanilla: ``proba_m1``,
        ``proba_m2``, ``bayes_factor``, ``scale1``, ``scale2``; then (``all_stats``)
        ``raw_mean1/2``, ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2``; and for
        group comparisons ``comparison``, ``group1``, ``group2``.
        """
        from scvi_fast.analysis import differential_expression as _de

        if weights not in (None, "uniform"):
            raise NotImplementedError("scvi_fast samples cells uniformly (weights='uniform')")
        if n_samples is not None:
            if "n_samples_overall" in kwargs and kwargs["n_samples_overall"] != n_samples:
                raise ValueError("pass either n_samples or n_samples_overall, not both")
            kwargs["n_samples_overall"] = n_samples
        data = self.adata if adata is None else adata
        if data is None:
            raise ValueError("this model holds no data; pass adata=...")
        if isinstance(data, (str, os.PathLike)):
            data = _data.CSRStore.open(data)
        source = self._source(data)
        obs = getattr(data, "obs", None)

        def iter_batches(rows):
            loader = self._loader(source, indices=rows, batch_size=batch_size)
            self.module.to(self.device).eval()
            for mb in loader:
                yield mb, mb.to(self.device, non_blocking=True)

        def representation(rows):
            with torch.inference_mode():
                return torch.cat([
                    self.module.inference(x, give_mean=True)["q_m"].cpu() for _, x in iter_batches(rows)
                ]).numpy()

        with torch.inference_mode():
            return _de(
                self.module, iter_batches, source.n_cells, self.var_names, self.batch_categories,
                obs=obs, groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2,
                mode=mode, delta=delta, all_stats=all_stats, batch_correction=batch_correction,
                batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, silent=silent,
                filter_outlier_cells=filter_outlier_cells, representation_fn=representation,
                seed=seed, **kwargs,
            )

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        transform_batch=None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        silent: bool = True,
    ):
        """Counts drawn from the posterior predictive ``p(x_hat | x)`` (negative binomial).

        ``z ~ q(z|x)`` then ``x_hat ~ NB(exp(l) rho, theta)`` (Gamma-Poisson), minibatch by
        minibatch. As scvi-tools 1.4 (which returns a ``sparse.GCXS``), the result is sparse:
        a ``scipy.sparse.csr_array`` of shape ``(n_cells, n_genes)`` when ``n_samples == 1``,
        else a ``scipy.sparse.coo_array`` of shape ``(n_cells, n_genes, n_samples)``; float32
        values holding non-negative integers. ``.todense()`` gives a numpy array in both
        cases. Genes of ``gene_list`` keep the model's gene order, as in scvi-tools.
        """
        import scipy.sparse as sp

        from scvi_fast.analysis import posterior_predictive

        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1; got {n_samples}")
        gene_idx = None
        if gene_list is not None:
            mask = self.var_names.isin(list(gene_list))
            if not mask.any():
                raise ValueError("None of the provided genes in ``gene_list`` were detected in the data.")
            gene_idx = np.flatnonzero(mask)
        parts = []
        for _, s in posterior_predictive(
            self.module, self._iter(adata, indices, batch_size), n_samples=n_samples,
            transform_codes=self._batch_codes_of(transform_batch), gene_idx=gene_idx,
        ):
            a = s.numpy()
            parts.append(sp.csr_array(a) if n_samples == 1 else sp.coo_array(a))
        n_genes = len(self.var_names) if gene_idx is None else len(gene_idx)
        if not parts:
            shape = (0, n_genes) if n_samples == 1 else (0, n_genes, n_samples)
            return sp.csr_array(shape, dtype=np.float32) if n_samples == 1 else sp.coo_array(shape, dtype=np.float32)
        if n_samples == 1:
            return sp.vstack(parts, format="csr")
        coords = [p.coords for p in parts]
        offsets = np.cumsum([0] + [p.shape[0] for p in parts[:-1]])
        rows = np.concatenate([c[0] + o for c, o in zip(coords, offsets)])
        rest = [np.concatenate([c[k] for c in coords]) for k in (1, 2)]
        data = np.concatenate([p.data for p in parts])
        return sp.coo_array((data, (rows, *rest)), shape=(int(sum(p.shape[0] for p in parts)), n_genes, n_samples))

    @torch.inference_mode()
    def _per_cell_losses(self, adata=None, indices=None, batch_size=None):
        recs, kls = [], []
        for _, x in self._iter(adata, indices, batch_size):
            _, _, out = self.module(x, kl_weight=1.0)
            recs.append(out.reconstruction_loss.double().cpu())
            kls.append(out.kl_local.double().cpu())
        return torch.cat(recs), torch.cat(kls)

    def get_elbo(self, adata=None, indices=None, batch_size=None, return_mean: bool = True):
        """The ELBO (higher is better): ``-mean(reconstruction_loss + kl_local)``, as scvi-tools.

        ``z`` is sampled from the posterior, as in scvi-tools.
        """
        rec, kl = self._per_cell_losses(adata, indices, batch_size)
        elbo = -(rec + kl)
        return float(elbo.mean()) if return_mean else elbo.numpy()

    def get_reconstruction_error(self, adata=None, indices=None, batch_size=None, return_mean: bool = True):
        """``{"reconstruction_loss": mean negative log-likelihood}`` (lower is better), as scvi-tools."""
        rec, _ = self._per_cell_losses(adata, indices, batch_size)
        return {"reconstruction_loss": float(rec.mean()) if return_mean else rec.numpy()}

    # ------------------------------------------------------------- save / load --
    def _config(self) -> dict:
        return {
            "format": "scvi_fast",
            "format_version": FORMAT_VERSION,
            "init_params": self.init_params_,
            "registry": {k: v for k, v in self.registry.items()},
            "is_trained": self.is_trained_,
            "history": self.history_,
            "train_params": getattr(self, "train_params_", {}),
        }

    def save(
        self,
        dir_path: str | os.PathLike,
        overwrite: bool = False,
        save_anndata: bool = False,
        format: Literal["scvi_fast", "scvi-tools"] = "scvi_fast",
    ) -> None:
        """Save to a folder, atomically (written beside it, then renamed into place).

        ``format="scvi_fast"`` writes ``model.safetensors`` and ``config.json`` (no
        pickle); ``format="scvi-tools"`` writes a ``model.pt`` that
        ``scvi.model.SCVI.load`` opens.
        """
        dir_path = Path(dir_path)
        if dir_path.exists() and not overwrite:
            raise FileExistsError(f"{dir_path} exists; pass overwrite=True to replace it")
        dir_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dir_path.parent, prefix=f".{dir_path.name}."))
        try:
            if format == "scvi_fast":
                self._save_native(tmp)
            elif format == "scvi-tools":
                from scvi_fast.compat import save_scvi_tools

                save_scvi_tools(self, tmp)
            else:
                raise ValueError(f"format must be 'scvi_fast' or 'scvi-tools'; got {format!r}")
            if save_anndata and self.adata is not None and hasattr(self.adata, "write_h5ad"):
                _data.write_h5ad(self.adata, tmp / "adata.h5ad")
            if dir_path.exists():
                old = dir_path.with_name(f".{dir_path.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(dir_path, old)
                os.replace(tmp, dir_path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, dir_path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_native(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        tensors.update({f"passthrough.{k}": v.detach().cpu().contiguous() for k, v in self._passthrough.items()})
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self._config(), indent=1))

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata=None, device: str = "cpu", impl: str | None = None) -> SCVI:
        """Load a model saved by :meth:`save` (or an scvi-tools model folder).

        ``adata`` (optional) must have the model's genes; its setup is transferred.
        """
        dir_path = Path(dir_path)
        if (dir_path / "config.json").exists() and (dir_path / "model.safetensors").exists():
            model = cls._load_native(dir_path, impl)
        elif (dir_path / "model.pt").exists():
            from scvi_fast.compat import load_scvi_tools

            model = load_scvi_tools(cls, dir_path, impl=impl)
        else:
            raise FileNotFoundError(
                f"{dir_path} holds neither an scvi_fast model (config.json + model.safetensors) "
                "nor an scvi-tools model (model.pt)"
            )
        if adata is None and (dir_path / "adata.h5ad").exists():
            import anndata

            adata = anndata.read_h5ad(dir_path / "adata.h5ad")
        if adata is not None:
            model.adata = model._transfer_setup(adata)
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        return model

    # ------------------------------------------------------- reference mapping --
    @staticmethod
    def prepare_query_anndata(adata, reference, return_reference_var_names: bool = False, inplace: bool = True):
        """Reorder a query's genes to the reference model's; missing genes become zeros.

        As scvi-tools: logs the fraction of reference genes found (warns below 80 %).
        ``reference`` is a model or a model folder (scvi_fast or scvi-tools).
        Returns None when ``inplace``, else the new AnnData; with
        ``return_reference_var_names=True`` only the reference's genes.
        """
        from scvi_fast.compat import prepare_query_anndata

        return prepare_query_anndata(adata, reference, return_reference_var_names, inplace)

    @classmethod
    def load_query_data(
        cls,
        adata,
        reference,
        freeze: bool = True,
        inplace_subset_query_vars: bool = False,
        device: str = "cpu",
        impl: str | None = None,
        unfrozen: bool | None = None,
    ) -> SCVI:
        """A model of query ``adata`` built on ``reference`` (a model or a model folder).

        New batch categories get new rows in every decoder layer's batch table.
        With ``freeze=True`` (scvi-tools: ``unfrozen=False``) only those rows train;
        the reference's weights and BatchNorm statistics stay bitwise unchanged.
        ``is_trained`` is False until :meth:`train`; embedding without
        fine-tuning is supported.
        """
        from scvi_fast.compat import load_query_data

        if unfrozen is not None:
            freeze = not unfrozen
        return load_query_data(cls, adata, reference, freeze=freeze,
                               inplace_subset_query_vars=inplace_subset_query_vars,
                               device=device, impl=impl)

    @classmethod
    def _load_native(cls, dir_path: Path, impl: str | None) -> SCVI:
        from safetensors.torch import load_file

        try:
            cfg = json.loads((dir_path / "config.json").read_text())
            tensors = load_file(str(dir_path / "model.safetensors"))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{dir_path} is not a readable scvi_fast model: {err}") from err
        if cfg.get("format") != "scvi_fast" or cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{dir_path}/config.json is not a supported scvi_fast model config")
        p = dict(cfg["init_params"])
        preset = p.pop("preset", None)
        stored_impl = p.pop("impl", "auto")
        model = cls(None, preset=preset, impl=impl or stored_impl, _registry=cfg["registry"], **p)
        state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        model.module.load_state_dict(state)
        model._passthrough = {k[len("passthrough."):]: v for k, v in tensors.items() if k.startswith("passthrough.")}
        model.is_trained_ = bool(cfg.get("is_trained", True))
        model.history_ = cfg.get("history", {})
        model.train_params_ = cfg.get("train_params", {})
        return model

    def _transfer_setup(self, adata):
        """Register a new AnnData with this model's setup (keys, layer, categories)."""
        if isinstance(adata, (str, os.PathLike)) or isinstance(adata, _data.CSRStore):
            return adata
        reg = self.registry
        self._check_genes(adata.var_names)
        if reg["batch_key"]:
            if reg["batch_key"] not in adata.obs:
                raise KeyError(f"adata.obs lacks the model's batch_key {reg['batch_key']!r}")
            _map_codes(adata.obs[reg["batch_key"]], reg["batch_categories"], reg["batch_key"])
        adata.uns[SETUP_KEY] = {
            "batch_key": reg["batch_key"],
            "labels_key": reg["labels_key"],
            "layer": reg["layer"],
            "batch_categories": list(reg["batch_categories"]),
            "labels_categories": list(reg["labels_categories"]),
        }
        return adata


def _ddp_train_worker(payload: dict):
    """One rank of ``SCVI.train(strategy="ddp", devices=N)`` (started by the elastic launcher)."""
    data = payload["data"]
    if isinstance(data, tuple):
        import anndata

        data = anndata.read_h5ad(data[1], backed="r")
    init = dict(payload["init"])
    model = SCVI(data, _registry=payload["registry"], **init)
    model.module.load_state_dict(payload["state"])
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
