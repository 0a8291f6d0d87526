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
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from scvi_fast import data as _data
from scvi_fast.model import _data as _access
from scvi_fast.model import _inference, _io, _query, _train_args, _training
from scvi_fast.model._config import architecture
from scvi_fast.model._registry import Registry
from scvi_fast.module import VAE, check_state


class SCVI:
    """scVI (Lopez et al. 2018) on fused kernels, with scvi-tools' likelihoods and options.

    Parameters
    ----------
    adata
        An AnnData registered with :meth:`setup_anndata`, a CSR store opened with
        :meth:`setup_store` (or its path), or a :class:`~scvi_fast.model.Registry` (a model of
        that setup holding no data).
    n_hidden, n_latent, n_layers, dropout_rate
        Architecture; scvi-tools' defaults 128 / 10 / 1 / 0.1.
    dispersion
        ``"gene"`` (default), ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``, as
        scvi-tools.
    gene_likelihood
        ``"zinb"`` (scvi-tools' default), ``"nb"`` or ``"poisson"``. The census preset is
        NB (the published CELLxGENE Census model is) unless this is given.
    use_observed_lib_size
        True (default): the observed total counts are the library; False: a library encoder
        with scvi-tools' per-batch log-normal prior, its parameters computed from the data.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal: ``z`` is the softmax of the sample).
    preset
        ``"census"``: the CZ CELLxGENE Census recipe (512 / 50 / 2; ``train`` then
        defaults to lr 1e-4, batch 1024, 100 epochs, 20 warm-up epochs).
    impl
        Back-end of the fused ops: ``"auto" | "triton" | "native" | "torch"``.
    seed
        Seed of the weight initialisation.
    encode_covariates
        Feed the batch and the covariates of ``setup_anndata`` to the encoder too
        (scvi-tools' default False).
    deeply_inject_covariates
        Inject the categorical covariates into every hidden layer, not only the first
        (scvi-tools' default True).

    Attributes
    ----------
    registry
        The :class:`~scvi_fast.model.Registry` (genes, covariate keys and categories, layer).
    passthrough
        scvi-tools tensors this model's options never compute with (e.g. the library encoder
        with the observed library, ``px_dropout_decoder`` unless ZINB), kept so that an export
        writes them back unchanged.
    scvi_tools_mappings
        scvi-tools' own category mappings of an imported model (e.g. integer batch ids),
        written back as they were on export.
    """

    def __init__(self, adata=None, n_hidden: int | None = None, n_latent: int | None = None,
                 n_layers: int | None = None, dropout_rate: float | None = None,
                 dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
                 gene_likelihood: Literal["zinb", "nb", "poisson"] | None = None,
                 use_observed_lib_size: bool = True,
                 latent_distribution: Literal["normal", "ln"] = "normal",
                 preset: Literal["census"] | None = None,
                 impl: Literal["auto", "triton", "native", "torch"] = "auto", seed: int = 0,
                 encode_covariates: bool | None = None,
                 deeply_inject_covariates: bool | None = None):
        if adata is None:
            raise ValueError("pass an AnnData registered with SCVI.setup_anndata, or a store")
        arch = architecture(preset, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
                            dropout_rate=dropout_rate, dispersion=dispersion,
                            gene_likelihood=gene_likelihood,
                            latent_distribution=latent_distribution,
                            use_observed_lib_size=use_observed_lib_size,
                            encode_covariates=encode_covariates,
                            deeply_inject_covariates=deeply_inject_covariates)
        registry = adata if isinstance(adata, Registry) else Registry.from_data(adata)
        library = None
        if not arch["use_observed_lib_size"]:
            if isinstance(adata, Registry):
                raise ValueError("use_observed_lib_size=False computes the library prior from "
                                 "the data; pass the AnnData or store, not a registry")
            library = _access.library_size_prior(registry, adata)
        self._build(registry, arch, preset, impl, seed, library)
        self.adata = None if isinstance(adata, Registry) else adata

    def _build(self, registry: Registry, arch: dict, preset, impl: str, seed: int,
               library: tuple | None = None) -> None:
        """``library``: the library prior's ``(means, vars)`` for ``use_observed_lib_size=False``
        (None: placeholders, for a model whose saved state is loaded next)."""
        self.registry, self.preset = registry, preset
        if not arch["use_observed_lib_size"] and library is None:
            k = max(registry.n_batch, 1)
            library = (np.zeros((1, k)), np.ones((1, k)))
        means, variances = library if library is not None else (None, None)
        # Weights are initialised from their own seeded stream so that a model
        # (and a CPU training run) is reproducible without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = VAE(n_input=len(registry.var_names), n_batch=registry.n_batch,
                              n_labels=registry.n_labels, impl=impl, library_log_means=means,
                              library_log_vars=variances,
                              n_cats_per_cov=registry.n_cats_per_cov,
                              n_continuous_cov=len(registry.continuous_covariate_keys),
                              use_size_factor_key=registry.size_factor_key is not None, **arch)
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
        # models saved before the likelihood was a setting are NB
        params.setdefault("gene_likelihood", "nb")
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
                      layer: str | None = None, size_factor_key: str | None = None,
                      categorical_covariate_keys: Sequence[str] | None = None,
                      continuous_covariate_keys: Sequence[str] | None = None) -> None:
        """Register an AnnData: which counts to model and which obs columns are covariates.

        As scvi-tools: ``categorical_covariate_keys`` are one-hot injected into the decoder
        (and the encoder with ``encode_covariates=True``) after the batch, each with its
        categories decided here; ``continuous_covariate_keys`` are numeric columns concatenated
        to the first layer's input; ``size_factor_key`` a positive column whose log replaces the
        observed log library (the expression scale is then a softplus, as scvi-tools').
        Validates that the counts are non-negative integers with no NaN/Inf and no empty
        cells, and the covariate columns, before any training starts.
        """
        registry = Registry.from_setup(
            adata, batch_key=batch_key, labels_key=labels_key, layer=layer,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, size_factor_key=size_factor_key)
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
            f"dispersion={a['dispersion']}, gene_likelihood={a['gene_likelihood']}, "
            f"latent_distribution={a['latent_distribution']}, "
            f"{len(self.registry.var_names)} genes, {self.registry.n_batch} batch categories; "
            f"trained: {self.is_trained_}"
        )

    def __repr__(self) -> str:
        return self.summary_string

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: ``{name: DataFrame indexed by epoch}``
        (validation metrics at the epochs validated, every ``check_val_every_n_epoch``)."""
        every = int((self.train_params_ or {}).get("check_val_every_n_epoch") or 1)

        def epochs(k, n):
            val = k.endswith("_validation") or k == "validation_loss"
            return (np.arange(n) + 1) * every - 1 if val else np.arange(n)

        return {
            k: pd.DataFrame({k: v}, index=pd.Index(epochs(k, len(v)), name="epoch"))
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
    #: rows of the last run's test set (cells in neither training nor validation)
    test_indices: np.ndarray | None = None
    #: the ``load_query_data`` freeze flags of a query model (None: not a query model)
    query_flags_: dict | None = None

    def train(self, max_epochs: int | None = None, accelerator: str = "auto",
              devices: int | list[int] | str = "auto", train_size: float | None = None,
              validation_size: float | None = None, shuffle_set_split: bool = True,
              load_sparse_tensor: bool = False, batch_size: int | None = None,
              early_stopping: bool = False, datasplitter_kwargs: dict | None = None,
              plan_config=None, plan_kwargs: dict | None = None, datamodule=None,
              trainer_config=None, *, lr: float | None = None,
              n_epochs_kl_warmup: int | None = -1, weight_decay: float = 1e-6,
              eps: float = 0.01, max_kl_weight: float = 1.0, min_kl_weight: float = 0.0,
              check_val_every_n_epoch: int | None = None, enable_progress_bar: bool = True,
              early_stopping_patience: int = 45, early_stopping_min_delta: float = 0.0,
              early_stopping_monitor: str = "elbo_validation",
              early_stopping_mode: Literal["min", "max"] = "min",
              early_stopping_warmup_epochs: int = 0,
              checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every_n_steps: int | None = None, resume: bool = False, seed: int = 0,
              device: str | None = None, progress_bar: bool | None = None,
              allow_tf32: bool = False, precision: Literal["32", "bf16-mixed"] = "32",
              compile_dense: bool = False, cuda_graph: bool | None = None,
              strategy: str = "auto", max_restarts: int = 0, **kwargs) -> SCVI:
        """Train the model, with scvi-tools' arguments and defaults (a preset may change the
        defaults of ``lr``, ``batch_size``, ``max_epochs`` and the KL warm-up).

        Parameters
        ----------
        max_epochs
            Default: scvi-tools' ``max(min(round(20000 / n_cells * 400), 400), 1)``
            (census preset: 100).
        accelerator, devices
            As scvi-tools: ``accelerator`` ``"auto"`` (CUDA if present), ``"cpu"``,
            ``"gpu"``/``"cuda"`` (others, e.g. ``"mps"``, are refused); ``devices`` ``"auto"``
            (one device), a number, ``-1`` (every GPU) or a list of GPU ids. Several devices
            train data-parallel (DDP, one process each): ``devices=[0, 1]`` on GPUs 0 and 1,
            ``accelerator="cpu", devices=2`` in two CPU processes.
        train_size, validation_size, shuffle_set_split
            scvi-tools' split: ``train_size=None`` is 0.9 with a last minibatch of 1-2 cells
            moved to validation; ``ceil(train_size * n)`` training cells, then
            ``floor(validation_size * n)`` (default: the rest) validation cells, the remainder
            a test set (``model.test_indices``); drawn with ``np.random.RandomState(seed)``,
            or, with ``shuffle_set_split=False``, in row order (validation first, then
            training, as scvi-tools' ``DataSplitter``).
        load_sparse_tensor
            Accepted and ignored: scvi_fast always streams CSR minibatches to the device.
        batch_size
            Minibatch size (128).
        early_stopping, early_stopping_patience, early_stopping_min_delta, early_stopping_monitor, early_stopping_mode, early_stopping_warmup_epochs
            As scvi-tools (``elbo_validation``, 45 checks, 0.0, ``"min"``, 0); turns on
            validation every epoch unless ``check_val_every_n_epoch`` says otherwise.
        datasplitter_kwargs
            ``external_indexing`` (``[train, validation, test]`` index arrays), ``drop_last``,
            ``pin_memory`` and :class:`~scvi_fast.data.CSRLoader` options; ``DataLoader``
            worker options are ignored with a warning.
        plan_config, plan_kwargs
            scvi-tools' ``TrainingPlan`` options (``plan_kwargs`` wins): ``lr``,
            ``weight_decay``, ``eps``, ``optimizer`` (``"Adam"``, ``"AdamW"``),
            ``n_epochs_kl_warmup``, ``n_steps_kl_warmup`` (per step, used when
            ``n_epochs_kl_warmup`` is None), ``max_kl_weight``, ``min_kl_weight``,
            ``reduce_lr_on_plateau`` with ``lr_factor``, ``lr_patience``, ``lr_threshold``,
            ``lr_min``, ``lr_scheduler_metric``, ``compile`` (``compile_dense``). A custom
            optimiser and ``update_only_decoder`` are refused.
        datamodule
            Not supported (scvi_fast reads the model's AnnData or CSR store).
        trainer_config, **kwargs
            Lightning ``Trainer`` options. Those that change training (``gradient_clip_val``,
            ``accumulate_grad_batches``, ``max_steps``, non-empty ``callbacks``...) raise an
            error naming them; logging and Lightning machinery (``logger``,
            ``log_every_n_steps``, ``enable_checkpointing``...) are ignored with a warning.
            :class:`~scvi_fast.data.CSRLoader` options (``block_size``, ``buffer_size``...)
            go to the loaders.
        lr, n_epochs_kl_warmup, weight_decay, eps, max_kl_weight, min_kl_weight
            Shortcuts of the ``plan_kwargs`` of the same names (1e-3, 400, 1e-6, 0.01, 1, 0).
        check_val_every_n_epoch
            Validate every n epochs (history ``elbo_validation``...); None (scvi-tools'
            default): never, unless early stopping or ``reduce_lr_on_plateau`` needs it.
        enable_progress_bar, progress_bar
            Show a progress bar (``progress_bar`` is scvi_fast's spelling and wins if given).
        checkpoint_dir, checkpoint_every_n_steps, resume
            Write ``checkpoint.pt`` atomically each epoch (and every n steps); with
            ``resume=True`` continue an interrupted run from it.
        seed
            Seeds the split, the shuffling and torch's sampling noise (scvi-tools:
            ``scvi.settings.seed``).
        device
            A torch device string (``"cpu"``, ``"cuda:1"``): scvi_fast's spelling of one device.
        allow_tf32, precision, compile_dense
            CUDA speed options (TF32 GEMMs; ``"bf16-mixed"`` autocast of the GEMMs with the
            likelihood in fp32; ``torch.compile`` of the dense stacks); ignored on the CPU.
        cuda_graph
            ``None``: on a single CUDA device (not DDP, not ``compile_dense``) the training and
            validation steps are captured as CUDA graphs and replayed; ``True`` requires it;
            ``False`` runs eagerly. Same arithmetic either way.
        strategy, max_restarts
            ``"auto"`` or ``"ddp"`` (any ``"ddp*"`` spelling). Under ``torchrun`` every rank
            calls ``train`` and trains its shard of each epoch; elsewhere one local rank per
            device is launched through torch's elastic launcher (restarted up to
            ``max_restarts`` times; with ``resume=True`` from the checkpoint) and rank 0's
            weights come back. ``batch_size`` is per rank.
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
        runs the encoder's GEMMs under bfloat16 autocast (CUDA only). For
        ``latent_distribution="ln"`` a sample is the softmax of a normal draw and the mean the
        average softmax of ``mc_samples`` draws (``return_dist``: the normal's mean and
        variance), as scvi-tools. Under a distributed job
        this is a collective: each rank embeds a contiguous share of the cells, writing its
        rows of ``out`` or gathering the whole array on every rank.
        """
        return _inference.latent(self, adata, indices, give_mean, batch_size, return_dist, out,
                                 progress_bar, precision, mc_samples)

    def get_normalized_expression(self, adata=None, indices: Sequence[int] | None = None,
                                  transform_batch=None, gene_list: Sequence[str] | None = None,
                                  library_size: float | Literal["latent"] = 1,
                                  n_samples: int = 1, n_samples_overall: int | None = None,
                                  weights: Literal["uniform", "importance"] | None = None,
                                  batch_size: int | None = None, return_mean: bool = True,
                                  return_numpy: bool | None = None, silent: bool = True,
                                  dataloader=None, data_loader_kwargs: dict | None = None,
                                  **importance_weighting_kwargs):
        """Normalised (denoised, optionally batch-corrected) expression.

        ``transform_batch``: a batch category (or a list, averaged) to decode every cell in;
        None keeps each cell's own batch. ``library_size``: scale to this library, or
        ``"latent"`` for the cell's observed library. ``n_samples`` posterior samples of ``z``,
        averaged when ``return_mean``. Returns a DataFrame (cells x genes) for a 2-D result,
        else a numpy array ``(n_samples, n_cells, n_genes)``.

        ``n_samples_overall`` (scvi-tools): ``n_samples_overall // n_cells + 1`` samples of
        every cell are decoded and ``n_samples_overall`` of them drawn with replacement
        (numpy's global generator), uniformly or, with ``weights="importance"``, with
        scvi-tools' importance weights (options ``max_cells=1024``, ``truncation=False``,
        ``n_mc_samples=500``, ``n_mc_samples_per_pass=250`` in
        ``**importance_weighting_kwargs``); returns a numpy array ``(n_samples_overall,
        n_genes)``. ``dataloader`` is not supported; ``silent`` has no effect.
        """
        _inference.no_dataloader(dataloader, data_loader_kwargs)
        return _inference.normalized_expression(
            self, adata, indices, transform_batch, gene_list, library_size, n_samples,
            batch_size, return_mean, return_numpy, n_samples_overall, weights,
            importance_weighting_kwargs)

    def differential_expression(self, adata=None, groupby: str | None = None,
                                group1: str | Sequence[str] | None = None,
                                group2: str | None = None, idx1=None, idx2=None,
                                mode: Literal["vanilla", "change"] = "vanilla",
                                delta: float | None = 0.25, batch_size: int | None = None,
                                all_stats: bool = True, batch_correction: bool = False,
                                batchid1: Sequence[str] | None = None,
                                batchid2: Sequence[str] | None = None, fdr_target: float = 0.05,
                                silent: bool = False,
                                weights: Literal["uniform", "importance"] | None = "uniform",
                                filter_outlier_cells: bool = False,
                                importance_weighting_kwargs: dict | None = None,
                                n_samples: int | None = None,
                                seed: int | None = None, **kwargs) -> pd.DataFrame:
        """Bayesian differential expression, with scvi-tools' modes, defaults and columns.

        ``groupby``/``group1``/``group2`` (default: each value against the rest) or
        ``idx1``/``idx2`` (masks, indices or ``obs.query`` strings) choose the groups;
        ``mode="vanilla"`` sorts by ``bayes_factor``, ``"change"`` by ``proba_de`` (with
        ``is_de_fdr_<fdr_target>``); ``batch_correction`` decodes both groups in every batch
        (or the ``batchid`` lists) and pairs samples within a batch; ``n_samples`` is
        scvi-tools' ``n_samples_overall``; ``seed`` makes the table reproducible; ``**kwargs``
        are ``get_bayes_factors`` options. ``weights="importance"`` samples each group with
        scvi-tools' importance weights (``importance_weighting_kwargs``: ``max_cells``,
        ``truncation``, ``n_mc_samples``, ``n_mc_samples_per_pass``). Returns a DataFrame
        indexed by gene name.
        """
        return _inference.differential_expression(
            self, adata, batch_size, batch_correction, batchid1, batchid2, n_samples, weights,
            importance_weighting_kwargs,
            groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2, mode=mode,
            delta=delta, all_stats=all_stats, fdr_target=fdr_target, silent=silent,
            filter_outlier_cells=filter_outlier_cells, seed=seed, **kwargs)

    def posterior_predictive_sample(self, adata=None, indices: Sequence[int] | None = None,
                                    transform_batch=None, n_samples: int = 1,
                                    gene_list: Sequence[str] | None = None,
                                    batch_size: int | None = None, silent: bool = True):
        """Counts drawn from the posterior predictive ``p(x_hat | x)`` (the gene likelihood).

        As scvi-tools 1.4, sparse: a ``scipy.sparse.csr_array`` ``(n_cells, n_genes)`` for
        one sample, else a ``coo_array`` ``(n_cells, n_genes, n_samples)``; float32 values
        holding non-negative integers; ``gene_list`` keeps the model's gene order.
        """
        return _inference.posterior_predictive(self, adata, indices, transform_batch, n_samples,
                                               gene_list, batch_size)

    def get_likelihood_parameters(self, adata=None, indices: Sequence[int] | None = None,
                                  n_samples: int | None = 1, give_mean: bool | None = False,
                                  batch_size: int | None = None, dataloader=None,
                                  **data_loader_kwargs) -> dict[str, np.ndarray]:
        """Parameters of ``p(x | z)`` for ``z`` drawn from the posterior (scvi-tools).

        NB: ``{"mean": exp(l) * rho, "dispersions": theta}``; ZINB adds ``"dropout"`` (the
        zero-inflation probability); Poisson: ``{"mean"}``. Float32 arrays ``(n_cells,
        n_genes)`` for ``n_samples=1``, else ``(n_samples, n_cells, n_genes)`` unless
        ``give_mean`` averages the samples (:data:`scvi_fast.analysis.LIKELIHOODS`).
        """
        _inference.no_dataloader(dataloader, data_loader_kwargs)
        return _inference.likelihood_parameters(self, adata, indices, int(n_samples or 1),
                                                bool(give_mean), batch_size)

    def get_marginal_ll(self, adata=None, indices: Sequence[int] | None = None,
                        n_mc_samples: int = 1000, batch_size: int | None = None,
                        return_mean: bool = True, dataloader=None,
                        data_loader_kwargs: dict | None = None, **kwargs):
        """Importance-sampled estimate of ``log p(x)`` with ``n_mc_samples`` posterior samples
        (scvi-tools' biased estimator; higher is better).

        ``return_mean``: the mean over minibatches (``batch_size`` cells, 128 by default) of
        each minibatch's mean, a float, as scvi-tools; else a tensor ``(n_cells,)``.
        ``n_mc_samples_per_pass`` (keyword) as scvi-tools.
        """
        _inference.no_dataloader(dataloader, data_loader_kwargs)
        return _inference.marginal_ll(self, adata, indices, n_mc_samples, batch_size,
                                      return_mean, **kwargs)

    def get_latent_library_size(self, adata=None, indices: Sequence[int] | None = None,
                                give_mean: bool = True, batch_size: int | None = None,
                                dataloader=None, **data_loader_kwargs) -> np.ndarray:
        """Library size of each cell, ``(n_cells, 1)``: the observed total counts with
        ``give_mean=False``; scVI's observed library has no posterior, so ``give_mean=True``
        raises scvi-tools' RuntimeError. With a library encoder
        (``use_observed_lib_size=False``): the log-normal posterior mean, or a draw."""
        _inference.no_dataloader(dataloader, data_loader_kwargs)
        return _inference.latent_library_size(self, adata, indices, give_mean, batch_size)

    def get_feature_correlation_matrix(self, adata=None, indices: Sequence[int] | None = None,
                                       n_samples: int = 10, batch_size: int = 64,
                                       rna_size_factor: int = 1000, transform_batch=None,
                                       correlation_type: Literal["spearman", "pearson"] = "spearman",
                                       silent: bool = True) -> pd.DataFrame:
        """Gene-gene correlation of denoised samples (scvi-tools): ``n_samples`` Gamma draws
        around ``rna_size_factor * rho`` per cell, correlated over cells and samples, averaged
        over the ``transform_batch`` batches. A genes x genes DataFrame."""
        return _inference.feature_correlation_matrix(
            self, adata, indices, n_samples, batch_size, rna_size_factor, transform_batch,
            correlation_type, silent)

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
    def load(cls, dir_path: str | os.PathLike, adata=None, accelerator: str = "auto",
             device: int | str = "auto", prefix: str | None = None, backup_url: str | None = None,
             datamodule=None, allowed_classes_names_list: list[str] | None = None,
             impl: str | None = None) -> SCVI:
        """Load a model saved by :meth:`save` (or an scvi-tools model folder).

        ``adata`` (optional; default the AnnData saved beside the model) must have the
        model's genes; the model's setup is transferred to it. ``accelerator`` / ``device``
        as scvi-tools: ``"auto"`` puts the model on the first GPU when one is present, else
        the CPU; ``device`` may be a GPU index or a torch device string (``"cuda:1"``).
        ``prefix``, ``backup_url``, ``datamodule`` and ``allowed_classes_names_list`` are
        scvi-tools' and not supported (an error when given).
        """
        _io.check_load_options(prefix=prefix, backup_url=backup_url, datamodule=datamodule,
                               allowed_classes_names_list=allowed_classes_names_list)
        target = _train_args.resolve_single_device(accelerator, device)
        config, state, registry = _io.read_parts(dir_path)
        if impl is not None:
            config = {**config, "init_params": {**config["init_params"], "impl": impl}}
        model = cls._from_parts(config, state, registry)
        adata = _io.saved_anndata(dir_path) if adata is None else adata
        if adata is not None:
            model.adata = _access.register(registry, adata)
        model.to_device(target)
        model.module.eval()
        return model

    def to_device(self, device: str | int | torch.device) -> None:
        """Move the model to ``device`` (``"cpu"``, a GPU index such as ``0``, ``"cuda:0"`` or a
        ``torch.device``), as scvi-tools."""
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.module.to(target)
        self.device = target

    def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:
        """Print the model's data setup: genes, layer and each covariate's key and categories
        (scvi-tools' registry summary). ``adata`` (default: the model's data) must be set up
        as the model (its genes and categories are checked)."""
        data = self.adata if adata is None else adata
        if data is not None and adata is not None:
            try:
                _access.register(self.registry, data)
            except (KeyError, ValueError) as err:
                raise ValueError(f"Given AnnData not setup with {type(self).__name__}. "
                                 "Cannot view setup summary.") from err
        print(_inference.setup_summary(self.registry, data,
                                       hide_state_registries=hide_state_registries))

    @staticmethod
    def prepare_query_anndata(adata, reference_model=None, return_reference_var_names: bool = False,
                              inplace: bool = True, *, reference=None):
        """Reorder a query's genes to the reference model's; missing genes become zeros.

        As scvi-tools: logs the fraction of reference genes found (warns below 80 %).
        ``reference_model`` (alias ``reference``) is a model or a model folder. Returns None
        when ``inplace``, else the new AnnData; with ``return_reference_var_names=True`` only
        the reference's genes (a ``pd.Index``).
        """
        ref = _query.reference_model_arg(reference_model, reference, "prepare_query_anndata")
        return _query.prepare_query_anndata(adata, ref, return_reference_var_names, inplace)

    @classmethod
    def load_query_data(cls, adata=None, reference_model=None, registry=None,
                        inplace_subset_query_vars: bool = False, accelerator: str = "auto",
                        device: int | str = "auto", unfrozen: bool = False,
                        freeze_dropout: bool = False, freeze_expression: bool = True,
                        freeze_decoder_first_layer: bool = True,
                        freeze_batchnorm_encoder: bool = True,
                        freeze_batchnorm_decoder: bool = False, freeze_classifier: bool = True,
                        transfer_batch: bool = True, datamodule=None, *, reference=None,
                        freeze: bool | None = None, impl: str | None = None) -> SCVI:
        """A model of query ``adata`` built on ``reference_model`` (scArches, as scvi-tools).

        ``reference_model`` (alias ``reference``) is a model or a model folder (scvi_fast's
        or scvi-tools'). New batch categories get new rows in every decoder layer's batch
        table. What trains follows scvi-tools' flags and defaults: ``unfrozen=True`` trains
        everything; otherwise the hidden layers' weights are frozen by zeroed gradients
        except the decoder's batch rows (``freeze_expression=False`` /
        ``freeze_decoder_first_layer=False`` free the first encoder / decoder layer), the
        decoder's BatchNorm scales train unless ``freeze_batchnorm_decoder``, the encoder's
        when ``freeze_batchnorm_encoder=False``, and ``freeze_dropout`` removes dropout. As
        in scvi-tools 1.4.2 the query trains in eval mode: the reference's BatchNorm running
        statistics normalise it and stay unchanged (see
        :func:`scvi_fast.module.set_online_update`). ``freeze_classifier`` has no effect (SCVI
        has no classifier); ``transfer_batch=False`` refuses batch categories the reference
        lacks. ``freeze`` is scvi_fast's earlier flag (``freeze=False`` is ``unfrozen=True``).
        ``is_trained`` is False until :meth:`train`; embedding without fine-tuning works.
        """
        if adata is None or registry is not None:
            raise NotImplementedError("load_query_data needs the query AnnData (adata=...); a "
                                      "registry without data is not supported")
        if datamodule is not None:
            raise NotImplementedError("datamodule is not supported: pass the query AnnData")
        if freeze is not None:
            warnings.warn("load_query_data(freeze=...) is deprecated: use scvi-tools' "
                          "unfrozen=... (freeze=False is unfrozen=True)", FutureWarning,
                          stacklevel=2)
            unfrozen = not freeze
        ref = _query.reference_model_arg(reference_model, reference, "load_query_data")
        flags = dict(unfrozen=unfrozen, freeze_dropout=freeze_dropout,
                     freeze_expression=freeze_expression,
                     freeze_decoder_first_layer=freeze_decoder_first_layer,
                     freeze_batchnorm_encoder=freeze_batchnorm_encoder,
                     freeze_batchnorm_decoder=freeze_batchnorm_decoder)
        model = _query.load_query_data(
            cls, adata, ref, _train_args.resolve_single_device(accelerator, device), flags,
            inplace_subset_query_vars=inplace_subset_query_vars, transfer_batch=transfer_batch,
            impl=impl)
        model.adata = _access.register(model.registry, adata)
        return model
