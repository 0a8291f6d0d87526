"""The user-facing scVI model, shaped like ``scvi.model.SCVI``.

Switching from scvi-tools is an import change::

    import scvi_fast
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi_fast.SCVI(adata)
    model.train()
    adata.obsm["X_scVI"] = model.get_latent_representation()

The class is thin: its parts live beside it (:mod:`._registry`, :mod:`._data`,
:mod:`._config`, :mod:`._training`, :mod:`._inference`, :mod:`._io`, :mod:`._query`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from scvi_fast import data as _data
from scvi_fast.model import _data as _access
from scvi_fast.model import _inference, _io, _query, _training
from scvi_fast.model._config import architecture
from scvi_fast.model._registry import Registry
from scvi_fast.module import VAE, check_state
from scvi_fast.train import resolve_device


class SCVI:
    """scVI (Lopez et al. 2018) with a negative-binomial likelihood, on fused kernels.

    Parameters
    ----------
    adata
        An AnnData registered with :meth:`setup_anndata`, a CSR store opened with
        :meth:`setup_store` (or its path), or a :class:`~scvi_fast.model.Registry` (a model of
        that setup holding no data).
    n_hidden, n_latent, n_layers, dropout_rate
        Architecture; scvi-tools' defaults 128 / 10 / 1 / 0.1.
    dispersion, gene_likelihood, latent_distribution
        Only ``"gene"``, ``"nb"`` and ``"normal"`` are supported.
    preset
        ``"census"``: the CZ CELLxGENE Census recipe (512 / 50 / 2; ``train`` then
        defaults to lr 1e-4, batch 1024, 100 epochs, 20 warm-up epochs).
    impl
        Back-end of the fused ops: ``"auto" | "triton" | "native" | "torch"``.
    seed
        Seed of the weight initialisation.

    Attributes
    ----------
    registry
        The :class:`~scvi_fast.model.Registry` (genes, covariate keys and categories, layer).
    passthrough
        scvi-tools tensors scvi_fast never computes with (library encoder, unused heads),
        kept so that an export writes them back unchanged.
    scvi_tools_mappings
        scvi-tools' own category mappings of an imported model (e.g. integer batch ids),
        written back as they were on export.
    """

    def __init__(self, adata=None, n_hidden: int | None = None, n_latent: int | None = None,
                 n_layers: int | None = None, dropout_rate: float | None = None,
                 dispersion: Literal["gene"] = "gene", gene_likelihood: Literal["nb"] = "nb",
                 latent_distribution: Literal["normal"] = "normal",
                 preset: Literal["census"] | None = None,
                 impl: Literal["auto", "triton", "native", "torch"] = "auto", seed: int = 0):
        if dispersion != "gene" or gene_likelihood != "nb" or latent_distribution != "normal":
            raise NotImplementedError(
                "scvi_fast implements scVI with dispersion='gene', gene_likelihood='nb' and "
                "latent_distribution='normal'; use scvi-tools for other variants"
            )
        if adata is None:
            raise ValueError("pass an AnnData registered with SCVI.setup_anndata, or a store")
        registry = adata if isinstance(adata, Registry) else Registry.from_data(adata)
        arch = architecture(preset, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
                            dropout_rate=dropout_rate)
        self._build(registry, arch, preset, impl, seed)
        self.adata = None if isinstance(adata, Registry) else adata

    def _build(self, registry: Registry, arch: dict, preset, impl: str, seed: int) -> None:
        self.registry, self.preset = registry, preset
        # Weights are initialised from their own seeded stream so that a model
        # (and a CPU training run) is reproducible without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = VAE(n_input=len(registry.var_names), n_batch=registry.n_batch,
                              n_labels=registry.n_labels, impl=impl, **arch)
        self.init_params_ = {**arch, "preset": preset, "impl": impl}
        self.adata = None
        self.is_trained_ = False
        self.history_: dict[str, list[float]] = {}
        self.train_params_: dict = {}
        self.train_indices = self.validation_indices = None
        self.passthrough: dict[str, torch.Tensor] = {}
        self.scvi_tools_mappings: dict[str, np.ndarray] = {}
        self.trainer = None
        self.device = torch.device("cpu")

    @classmethod
    def _from_parts(cls, config: dict, state: dict | None, registry: Registry) -> SCVI:
        """The one constructor from saved state (native load, scvi-tools import, query
        mapping, the ranks of a data-parallel run).

        ``config``: ``init_params`` (architecture, ``preset``, ``impl``, optionally the
        ``seed`` of the initialisation; checked against their bounds before anything is
        built) and optionally ``origin`` (how errors name the source), ``is_trained``, ``history``,
        ``train_params``, ``scvi_tools_mappings``, ``train_indices``, ``validation_indices``.
        ``state``: ``module.*`` and ``passthrough.*`` tensors (None: freshly initialised).
        """
        params = dict(config["init_params"])
        preset, impl, seed = params.pop("preset", None), params.pop("impl", "auto"), params.pop("seed", 0)
        model = cls.__new__(cls)
        model._build(registry, architecture(preset, **params), preset, impl, seed)
        if state is not None:
            module_state = {k[len("module."):]: v for k, v in state.items()
                            if k.startswith("module.")}
            check_state(model.module, module_state, config.get("origin", "the saved model"))
            model.module.load_state_dict(module_state)
            model.passthrough = {k[len("passthrough."):]: v for k, v in state.items()
                                 if k.startswith("passthrough.")}
        model.is_trained_ = bool(config.get("is_trained", state is not None))
        model.history_ = dict(config.get("history") or {})
        model.train_params_ = dict(config.get("train_params") or {})
        model.scvi_tools_mappings = _io.decode_mappings(config.get("scvi_tools_mappings"))
        model.train_indices = config.get("train_indices")
        model.validation_indices = config.get("validation_indices")
        return model

    # ------------------------------------------------------------------ setup --
    @classmethod
    def setup_anndata(cls, adata, batch_key: str | None = None, labels_key: str | None = None,
                      layer: str | None = None) -> None:
        """Register an AnnData: which counts to model and which obs columns are covariates.

        Validates that the counts are non-negative integers with no NaN/Inf and no empty
        cells, before any training starts.
        """
        registry = Registry.from_setup(adata, batch_key=batch_key, labels_key=labels_key,
                                       layer=layer)
        _data.check_counts(adata, layer=layer)
        registry.write_setup(adata)

    @classmethod
    def setup_store(cls, path: str | os.PathLike):
        """Open (and validate) a CSR store written by ``scvi_fast.data.CSRStore.create``; the
        store carries its batch and label codes and is what ``SCVI(store)`` takes."""
        return _data.CSRStore.open(path)

    @property
    def var_names(self) -> pd.Index:
        return pd.Index(self.registry.var_names)

    @property
    def batch_categories(self) -> list[str]:
        return list(self.registry.batch_categories)

    @property
    def is_trained(self) -> bool:
        return self.is_trained_

    @property
    def summary_string(self) -> str:
        a = self.init_params_
        return (
            f"SCVI model with n_hidden={a['n_hidden']}, n_latent={a['n_latent']}, "
            f"n_layers={a['n_layers']}, dropout_rate={a['dropout_rate']}, "
            f"{len(self.registry.var_names)} genes, {self.registry.n_batch} batch categories; "
            f"trained: {self.is_trained_}"
        )

    def __repr__(self) -> str:
        return self.summary_string

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: ``{name: DataFrame indexed by epoch}``."""
        return {
            k: pd.DataFrame({k: v}, index=pd.Index(np.arange(len(v)), name="epoch"))
            for k, v in self.history_.items()
        }

    # ------------------------------------------------------------ data access --
    def _source(self, adata=None) -> _data.Source:
        """A row source for ``adata`` (default: the model's data) in the model's codes."""
        return _access.source_for(self.registry, self.adata if adata is None else adata,
                                  trusted=adata is None or adata is self.adata)

    def _loader(self, source, indices=None, batch_size=None, pin_memory=False, **kwargs):
        return _access.loader(source, self.device, indices=indices, batch_size=batch_size,
                              pin_memory=pin_memory, **kwargs)

    def _iter(self, adata=None, indices=None, batch_size=None):
        """``(host minibatch, device minibatch)`` pairs over ``adata`` (rows in order)."""
        return _access.batches(self.module, self.device, self._source(adata), indices, batch_size)

    def _n_rows(self, adata=None, indices=None) -> int:
        return _access.n_rows(self.adata if adata is None else adata, indices)

    # --------------------------------------------------------------- training --
    def train(self, max_epochs: int | None = None, batch_size: int | None = None,
              lr: float | None = None, n_epochs_kl_warmup: int | None = -1,
              train_size: float = 0.9, validation_size: float | None = None,
              early_stopping: bool = False, early_stopping_patience: int = 45,
              early_stopping_min_delta: float = 0.0,
              early_stopping_monitor: str = "elbo_validation", weight_decay: float = 1e-6,
              eps: float = 0.01, max_kl_weight: float = 1.0, min_kl_weight: float = 0.0,
              checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every_n_steps: int | None = None, resume: bool = False, seed: int = 0,
              device: str = "auto", accelerator: str | None = None, progress_bar: bool = True,
              plan_kwargs: dict | None = None, allow_tf32: bool = False,
              precision: Literal["32", "bf16-mixed"] = "32", compile_dense: bool = False,
              cuda_graph: bool | None = None, strategy: Literal["auto", "ddp"] = "auto",
              devices: int | Literal["auto"] = "auto", max_restarts: int = 0,
              **loader_kwargs) -> SCVI:
        """Train the model (scvi-tools' defaults unless a preset says otherwise).

        Parameters
        ----------
        max_epochs
            Default: scvi-tools' ``min(round(20000 / n_cells * 400), 400)`` (census: 100).
        batch_size, lr, n_epochs_kl_warmup
            Minibatch size (128), Adam learning rate (1e-3), KL warm-up epochs (400);
            ``plan_kwargs={"lr": ...}`` is accepted as in scvi-tools.
        train_size, validation_size
            Fractions of cells for training and validation (90/10 by default), split with a
            ``np.random.RandomState(seed)`` permutation.
        early_stopping, early_stopping_patience, early_stopping_min_delta, early_stopping_monitor
            As scvi-tools (monitors ``elbo_validation``).
        weight_decay, eps, max_kl_weight, min_kl_weight
            Adam's weight decay (1e-6) and epsilon (0.01); the KL weight's range.
        checkpoint_dir, checkpoint_every_n_steps, resume
            Write ``checkpoint.pt`` atomically each epoch (and every n steps); with
            ``resume=True`` continue an interrupted run from it.
        seed
            Seeds the split, the shuffling and torch's sampling noise.
        device, accelerator
            ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda[:i]"``.
        allow_tf32, precision, compile_dense
            CUDA speed options (TF32 GEMMs; ``"bf16-mixed"`` autocast of the GEMMs with the
            likelihood in fp32; ``torch.compile`` of the dense stacks); ignored on the CPU.
        cuda_graph
            ``None``: on a single CUDA device (not DDP, not ``compile_dense``) the training and
            validation steps are captured as CUDA graphs and replayed; ``True`` requires it;
            ``False`` runs eagerly. Same arithmetic either way.
        strategy, devices, max_restarts
            ``"ddp"``: data-parallel training, one process per GPU (NCCL) or CPU share (gloo).
            Under ``torchrun`` every rank calls ``train`` and trains its shard of each epoch;
            elsewhere ``devices`` local ranks are launched through torch's elastic launcher
            (restarted up to ``max_restarts`` times; with ``resume=True`` from the checkpoint)
            and rank 0's weights come back. ``batch_size`` is per rank.
        **loader_kwargs
            Passed to :class:`scvi_fast.data.CSRLoader` (``block_size``, ``buffer_size``...).
        """
        call = {k: v for k, v in locals().items() if k != "self"}
        return _training.fit(self, call)

    # -------------------------------------------------------------- inference --
    def get_latent_representation(self, adata=None, indices: Sequence[int] | None = None,
                                  give_mean: bool = True, mc_samples: int = 5000,
                                  batch_size: int | None = None, return_dist: bool = False,
                                  out: str | os.PathLike | None = None,
                                  progress_bar: bool = False,
                                  precision: Literal["32", "bf16-mixed"] = "32"):
        """Posterior mean (or a sample) of ``z`` for each cell, ``(n_cells, n_latent)``.

        Streams minibatches through the encoder only (an in-memory AnnData, a backed
        ``.h5ad`` or a CSR store of any size). ``batch_size`` defaults to 16384 on a GPU,
        1024 on the CPU; ``return_dist`` returns ``(q_m, q_v)``; ``out`` writes a ``.npy`` file
        block by block and returns it as a read-only memory map; ``precision="bf16-mixed"``
        runs the encoder's GEMMs under bfloat16 autocast (CUDA only). Under a distributed job
        this is a collective: each rank embeds a contiguous share of the cells, writing its
        rows of ``out`` or gathering the whole array on every rank.
        """
        return _inference.latent(self, adata, indices, give_mean, batch_size, return_dist, out,
                                 progress_bar, precision)

    def get_normalized_expression(self, adata=None, indices: Sequence[int] | None = None,
                                  transform_batch=None, gene_list: Sequence[str] | None = None,
                                  library_size: float | Literal["latent"] = 1,
                                  n_samples: int = 1, batch_size: int | None = None,
                                  return_mean: bool = True, return_numpy: bool | None = None):
        """Normalised (denoised, optionally batch-corrected) expression.

        ``transform_batch``: a batch category (or a list, averaged) to decode every cell in;
        None keeps each cell's own batch. ``library_size``: scale to this library, or
        ``"latent"`` for the cell's observed library. ``n_samples`` posterior samples of ``z``,
        averaged when ``return_mean``. Returns a DataFrame (cells x genes) for a 2-D result,
        else a numpy array ``(n_samples, n_cells, n_genes)``.
        """
        return _inference.normalized_expression(
            self, adata, indices, transform_batch, gene_list, library_size, n_samples,
            batch_size, return_mean, return_numpy)

    def differential_expression(self, adata=None, groupby: str | None = None,
                                group1: str | Sequence[str] | None = None,
                                group2: str | None = None, idx1=None, idx2=None,
                                mode: Literal["vanilla", "change"] = "vanilla",
                                delta: float | None = 0.25, batch_size: int | None = None,
                                all_stats: bool = True, batch_correction: bool = False,
                                batchid1: Sequence[str] | None = None,
                                batchid2: Sequence[str] | None = None, fdr_target: float = 0.05,
                                silent: bool = False,
                                weights: Literal["uniform"] | None = "uniform",
                                filter_outlier_cells: bool = False, n_samples: int | None = None,
                                seed: int | None = None, **kwargs) -> pd.DataFrame:
        """Bayesian differential expression, with scvi-tools' modes, defaults and columns.

        ``groupby``/``group1``/``group2`` (default: each value against the rest) or
        ``idx1``/``idx2`` (masks, indices or ``obs.query`` strings) choose the groups;
        ``mode="vanilla"`` sorts by ``bayes_factor``, ``"change"`` by ``proba_de`` (with
        ``is_de_fdr_<fdr_target>``); ``batch_correction`` decodes both groups in every batch
        (or the ``batchid`` lists) and pairs samples within a batch; ``n_samples`` is
        scvi-tools' ``n_samples_overall``; ``seed`` makes the table reproducible; ``**kwargs``
        are ``get_bayes_factors`` options. Returns a DataFrame indexed by gene name.
        """
        return _inference.differential_expression(
            self, adata, batch_size, batch_correction, batchid1, batchid2, n_samples, weights,
            groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2, mode=mode,
            delta=delta, all_stats=all_stats, fdr_target=fdr_target, silent=silent,
            filter_outlier_cells=filter_outlier_cells, seed=seed, **kwargs)

    def posterior_predictive_sample(self, adata=None, indices: Sequence[int] | None = None,
                                    transform_batch=None, n_samples: int = 1,
                                    gene_list: Sequence[str] | None = None,
                                    batch_size: int | None = None, silent: bool = True):
        """Counts drawn from the posterior predictive ``p(x_hat | x)`` (negative binomial).

        As scvi-tools 1.4, sparse: a ``scipy.sparse.csr_array`` ``(n_cells, n_genes)`` for
        one sample, else a ``coo_array`` ``(n_cells, n_genes, n_samples)``; float32 values
        holding non-negative integers; ``gene_list`` keeps the model's gene order.
        """
        return _inference.posterior_predictive(self, adata, indices, transform_batch, n_samples,
                                               gene_list, batch_size)

    def get_elbo(self, adata=None, indices=None, batch_size=None, return_mean: bool = True):
        """The ELBO (higher is better): ``-mean(reconstruction_loss + kl_local)``, as scvi-tools
        (``z`` sampled from the posterior)."""
        rec, kl = _inference.per_cell_losses(self, adata, indices, batch_size)
        elbo = -(rec + kl)
        return float(elbo.mean()) if return_mean else elbo.numpy()

    def get_reconstruction_error(self, adata=None, indices=None, batch_size=None,
                                 return_mean: bool = True):
        """``{"reconstruction_loss": mean negative log-likelihood}`` (lower is better)."""
        rec, _ = _inference.per_cell_losses(self, adata, indices, batch_size)
        return {"reconstruction_loss": float(rec.mean()) if return_mean else rec.numpy()}

    # ------------------------------------------------------------- save / load --
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False,
             save_anndata: bool = False,
             format: Literal["scvi_fast", "scvi-tools"] = "scvi_fast") -> None:
        """Save to a folder, atomically (written beside it, then renamed into place).

        ``"scvi_fast"``: ``model.safetensors`` and ``config.json`` (no pickle);
        ``"scvi-tools"``: a ``model.pt`` that ``scvi.model.SCVI.load`` opens.
        """
        _io.save(self, dir_path, overwrite, save_anndata, format)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata=None, device: str = "cpu",
             impl: str | None = None) -> SCVI:
        """Load a model saved by :meth:`save` (or an scvi-tools model folder).

        ``adata`` (optional; default the AnnData saved beside the model) must have the
        model's genes; the model's setup is transferred to it.
        """
        config, state, registry = _io.read_parts(dir_path)
        if impl is not None:
            config = {**config, "init_params": {**config["init_params"], "impl": impl}}
        model = cls._from_parts(config, state, registry)
        adata = _io.saved_anndata(dir_path) if adata is None else adata
        if adata is not None:
            model.adata = _access.register(registry, adata)
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        return model

    @staticmethod
    def prepare_query_anndata(adata, reference, return_reference_var_names: bool = False,
                              inplace: bool = True):
        """Reorder a query's genes to the reference model's; missing genes become zeros.

        As scvi-tools: logs the fraction of reference genes found (warns below 80 %).
        ``reference`` is a model or a model folder. Returns None when ``inplace``, else the
        new AnnData; with ``return_reference_var_names=True`` only the reference's genes.
        """
        return _query.prepare_query_anndata(adata, reference, return_reference_var_names, inplace)

    @classmethod
    def load_query_data(cls, adata, reference, freeze: bool = True,
                        inplace_subset_query_vars: bool = False, device: str = "cpu",
                        impl: str | None = None, unfrozen: bool | None = None) -> SCVI:
        """A model of query ``adata`` built on ``reference`` (a model or a model folder).

        New batch categories get new rows in every decoder layer's batch table. With
        ``freeze=True`` (scvi-tools: ``unfrozen=False``) only those rows train; the
        reference's weights and BatchNorm statistics stay bitwise unchanged. ``is_trained``
        is False until :meth:`train`; embedding without fine-tuning is supported.
        """
        if unfrozen is not None:
            freeze = not unfrozen
        model = _query.load_query_data(cls, adata, reference, freeze=freeze,
                                       inplace_subset_query_vars=inplace_subset_query_vars,
                                       device=device, impl=impl)
        model.adata = _access.register(model.registry, adata)
        return model
