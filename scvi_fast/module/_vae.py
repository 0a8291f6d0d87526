"""scVI's VAE (scvi-tools ``scvi.module.VAE`` with ``gene_likelihood="nb"``).

Inference: ``log1p`` counts -> encoder -> ``q_m``, ``q_v = exp(raw) + VAR_EPS`` -> ``z``;
the library is the observed ``log(sum_g x_g)``. Generative: ``[z, batch]`` ->
decoder with the batch injected into every layer -> softmax logits and
``theta = exp(px_r)``. Loss: per-cell ``-log NB(x | exp(l) softmax, theta)`` and analytic
KL, with the output layer fused into the likelihood (one route: :meth:`VAE.loss`). The
``px_dropout`` head and the library encoder of scvi-tools are never computed (NB does not
read them); their weights live in checkpoints only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import torch
from torch import nn

from scvi_fast import functional as F_ops
from scvi_fast.module._layers import CovariateLinear, DenseBlock, OutputLinear, SparseInputLinear
from scvi_fast.reference import VAR_EPS, csr_masked, csr_to_dense, log_nb_positive


def fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in float32 when autocast made it a 16-bit float (bf16 GEMMs); else as it is.

    Sampling, the KL, the softmax and the likelihood always run in float32 or better.
    """
    if t is not None and t.dtype in (torch.bfloat16, torch.float16):
        return t.float()
    return t


def posterior_variance(raw: torch.Tensor) -> torch.Tensor:
    """``q_v = exp(raw) + VAR_EPS``: the encoder's variance head made a variance."""
    return torch.exp(raw) + VAR_EPS


def sample_z(q_m: torch.Tensor, q_v: torch.Tensor, n: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``z = q_m + sqrt(q_v) * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``.

    Parameters
    ----------
    q_m, q_v
        Posterior means and variances, ``(B, Z)`` (from :meth:`VAE.posterior`).
    n
        Samples per cell: None gives ``(B, Z)``, an integer ``(n, B, Z)``.
    generator
        torch generator of the noise (None: torch's global generator).
    """
    shape = q_m.shape if n is None else (n, *q_m.shape)
    eps = torch.randn(shape, dtype=q_m.dtype, device=q_m.device, generator=generator)
    return q_m + torch.sqrt(q_v) * eps


def kl_weight(
    epoch: int,
    n_epochs_kl_warmup: int | None,
    max_kl_weight: float = 1.0,
    min_kl_weight: float = 0.0,
    step: int = 0,
    n_steps_kl_warmup: int | None = None,
) -> float:
    """KL annealing weight at (0-based) ``epoch`` and global ``step``, as scvi-tools'
    training plan (``_compute_kl_weight``, same arithmetic).

    Rises linearly from ``min_kl_weight`` to ``max_kl_weight`` over ``n_epochs_kl_warmup``
    epochs, or, when that is None (or 0), over ``n_steps_kl_warmup`` optimiser steps;
    constant ``max_kl_weight`` without warm-up.
    """
    if min_kl_weight > max_kl_weight:
        raise ValueError(f"min_kl_weight={min_kl_weight} is larger than max_kl_weight={max_kl_weight}.")
    slope = max_kl_weight - min_kl_weight
    if n_epochs_kl_warmup:
        if epoch < n_epochs_kl_warmup:
            return slope * (epoch / n_epochs_kl_warmup) + min_kl_weight
    elif n_steps_kl_warmup:
        if step < n_steps_kl_warmup:
            return slope * (step / n_steps_kl_warmup) + min_kl_weight
    return max_kl_weight


def _tile(t: torch.Tensor, n: int) -> torch.Tensor:
    """Per-cell rows ``t`` repeated (whole, in order) to ``n`` rows: the inputs of cells decoded
    for several samples of ``z`` at once (``(S, B, Z)`` flattened sample-major)."""
    if t.shape[0] == n:
        return t
    return t.repeat(n // t.shape[0], *([1] * (t.dim() - 1)))


@dataclass
class LossOutput:
    """Per-cell loss terms of a minibatch and the weighted scalar to optimise."""

    loss: torch.Tensor  #: mean over cells of ``reconst + kl_weight * kl``
    reconstruction_loss: torch.Tensor  #: ``(B,)`` negative NB log-likelihood
    kl_local: torch.Tensor  #: ``(B,)`` KL(q(z|x) || N(0, I))

    @property
    def n_obs(self) -> int:
        return int(self.reconstruction_loss.shape[0])


class Encoder(nn.Module):
    """``x -> log1p -> [Linear BN ReLU Dropout] x n_layers -> (q_m, raw q_v)``.

    With ``n_cov`` / ``n_cont`` (scvi-tools' ``encode_covariates=True``) the first layer also
    reads the categorical codes and the continuous covariates; the later layers read the codes
    when ``deep`` (``deeply_inject_covariates``).
    """

    def __init__(self, n_input, n_latent, n_hidden, n_layers, dropout_rate, impl,
                 n_cov: int = 0, n_cont: int = 0, deep: bool = True):
        super().__init__()
        self.first = SparseInputLinear(n_input, n_hidden, transform="log1p", impl=impl,
                                       n_cov=n_cov, n_cont=n_cont)
        self.linears = nn.ModuleList(
            [CovariateLinear(n_hidden, n_hidden, n_cov if deep else 0)
             for _ in range(n_layers - 1)]
        )
        self.blocks = nn.ModuleList(
            [DenseBlock(n_hidden, dropout_rate, impl=impl) for _ in range(n_layers)]
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.var = nn.Linear(n_hidden, n_latent)

    def forward(self, x, need_var: bool = True, cov: torch.Tensor | None = None,
                cont: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.blocks[0](self.first(x, cov, cont))
        for linear, block in zip(self.linears, self.blocks[1:]):
            h = block(linear(h, cov))
        return self.mean(h), (self.var(h) if need_var else None)


class Decoder(nn.Module):
    """``[z, cont, onehot(batch), onehot(cat_1)...] -> [Linear BN ReLU] x n_layers -> logits``.

    The categorical one-hots enter every layer when ``deep`` (``deeply_inject_covariates``),
    else the first only; the continuous covariates enter the first layer only (scvi-tools
    concatenates them to ``z``).
    """

    def __init__(self, n_latent, n_output, n_hidden, n_layers, n_cov, n_cont: int = 0,
                 deep: bool = True):
        super().__init__()
        dims = [n_latent] + [n_hidden] * n_layers
        self.linears = nn.ModuleList(
            [CovariateLinear(dims[i], dims[i + 1], n_cov if (i == 0 or deep) else 0,
                             n_cont if i == 0 else 0) for i in range(n_layers)]
        )
        self.blocks = nn.ModuleList([DenseBlock(n_hidden, 0.0) for _ in range(n_layers)])
        self.scale = OutputLinear(n_hidden, n_output)  # column-major weight, see there

    def hidden(self, z: torch.Tensor, batch: torch.Tensor | None,
               cont: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer, the input of the output layer ``scale``. ``batch``: the
        (offset, stacked) categorical codes, ``cont``: the continuous covariates."""
        h = z
        for i, (linear, block) in enumerate(zip(self.linears, self.blocks)):
            h = block(linear(h, batch, cont if i == 0 else None))
        return h

    def forward(self, z: torch.Tensor, batch: torch.Tensor | None,
                cont: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale(self.hidden(z, batch, cont))


class VAE(nn.Module):
    """scVI with a negative-binomial likelihood and per-gene dispersion.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batch categories; with one (or none) the decoder has no
        covariate columns, like scvi-tools.
    n_labels
        Number of label categories (recorded; NB-scVI does not use labels).
    n_hidden, n_latent, n_layers, dropout_rate
        Architecture, scvi-tools' defaults 128 / 10 / 1 / 0.1.
    impl
        Back-end of the fused ops (``"auto" | "triton" | "native" | "torch"``).
    n_cats_per_cov
        Categories of each extra categorical covariate (scvi-tools' ``n_cats_per_cov``); one
        with a single category adds no columns, as in scvi-tools. Their one-hot columns follow
        the batch's in one stacked table per layer (codes offset, see :meth:`covariate_codes`).
    n_continuous_cov
        Number of continuous covariates, concatenated to the first layer's input.
    encode_covariates
        Feed the batch and the covariates to the encoder too.
    deeply_inject_covariates
        Inject the categorical covariates into every hidden layer (else the first only).
    use_size_factor_key
        Use the minibatch's ``size_factor`` as the library (``log`` of it) and scvi-tools'
        ``softplus`` expression scale instead of the softmax.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        impl: str = "auto",
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_size_factor_key: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1; got {n_layers}")
        self.n_input, self.n_batch, self.n_labels = n_input, n_batch, n_labels
        self.n_hidden, self.n_latent, self.n_layers = n_hidden, n_latent, n_layers
        self.dropout_rate = dropout_rate
        self._impl = impl
        self.n_cats_per_cov = tuple(int(k) for k in n_cats_per_cov)
        self.n_continuous_cov = int(n_continuous_cov)
        self.encode_covariates = bool(encode_covariates)
        self.deeply_inject_covariates = bool(deeply_inject_covariates)
        self.use_size_factor_key = bool(use_size_factor_key)
        # scvi-tools' cat_list: the batch, then each covariate; one category adds no column
        sizes = [int(n_batch), *self.n_cats_per_cov]
        self._cat_columns = [i for i, k in enumerate(sizes) if k > 1]
        offsets = np.concatenate([[0], np.cumsum([sizes[i] for i in self._cat_columns])])
        n_cov = int(offsets[-1])
        self.register_buffer("cat_offsets", torch.as_tensor(offsets[:-1], dtype=torch.int64),
                             persistent=False)
        n_cont, deep = self.n_continuous_cov, self.deeply_inject_covariates
        self.encoder = Encoder(
            n_input, n_latent, n_hidden, n_layers, dropout_rate, impl,
            n_cov=n_cov if encode_covariates else 0,
            n_cont=n_cont if encode_covariates else 0, deep=deep)
        self.decoder = Decoder(n_latent, n_input, n_hidden, n_layers, n_cov, n_cont, deep)
        self.px_r = nn.Parameter(torch.randn(n_input))

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        F_ops._check_impl(value)
        self._impl = value
        self.encoder.first.impl = value
        for block in self.encoder.blocks:
            block.impl = value

    @property
    def has_covariates(self) -> bool:
        return self.decoder.linears[0].weight_cov is not None

    def covariate_codes(self, batch: torch.Tensor | None,
                        cat_covs: torch.Tensor | None = None) -> torch.Tensor | None:
        """The categorical codes of a minibatch, offset into the stacked one-hot tables.

        ``batch`` ``(B,)`` and ``cat_covs`` ``(B, n_cats)`` (codes in each covariate's
        categories) become ``(B,)`` codes when one categorical has columns, ``(B, C)`` when
        several do, None when none does (the layers then take no codes).
        """
        if not self._cat_columns:
            return None
        cols = []
        for i in self._cat_columns:
            if i == 0:
                if batch is None:
                    raise ValueError("this model has batch covariates; the minibatch carries none")
                cols.append(batch.reshape(-1))
            else:
                if cat_covs is None:
                    raise ValueError("this model has categorical covariates; the minibatch "
                                     "carries none")
                cols.append(cat_covs[:, i - 1])
        if len(cols) == 1:
            return cols[0].to(device=self.cat_offsets.device, dtype=torch.int64)
        codes = torch.stack(cols, 1).to(device=self.cat_offsets.device, dtype=torch.int64)
        return codes + self.cat_offsets

    def _continuous(self, cont_covs: torch.Tensor | None) -> torch.Tensor | None:
        if not self.n_continuous_cov:
            return None
        if cont_covs is None:
            raise ValueError("this model has continuous covariates; the minibatch carries none")
        return cont_covs.reshape(-1, self.n_continuous_cov)

    @staticmethod
    def covariates_of(x) -> dict:
        """``cat_covs`` / ``cont_covs`` of minibatch ``x`` (None where it has none), the
        keyword arguments :meth:`generative` and :meth:`decode_scale` take beside the batch."""
        return {"cat_covs": getattr(x, "cat_covs", None), "cont_covs": getattr(x, "cont_covs", None)}

    # ---- inference -------------------------------------------------------------
    def _encode(self, x, need_var: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(q_m, raw)``: the encoder's heads, in float32 when autocast ran them in 16 bits."""
        cov = cont = None
        if self.encode_covariates:
            cov = self.covariate_codes(x.batch, getattr(x, "cat_covs", None))
            cont = self._continuous(getattr(x, "cont_covs", None))
        q_m, raw = self.encoder(x, need_var, cov, cont)
        return fp32(q_m), fp32(raw)

    def posterior(self, x, need_var: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior mean and variance ``(q_m, q_v)`` of ``z``: the encoder only, no sampling.

        ``q_v = exp(raw) + VAR_EPS``. With ``need_var=False`` the variance head is skipped and
        ``q_v`` is None. Sample from it with :func:`sample_z`.
        """
        q_m, raw = self._encode(x, need_var)
        return q_m, (posterior_variance(raw) if need_var else None)

    def log_library(self, x, dtype=torch.float32) -> torch.Tensor:
        """``(B,)`` log of what scales the expression rate: the observed library ``sum_g x_g``,
        or the minibatch's ``size_factor`` with ``use_size_factor_key`` (as scvi-tools)."""
        if self.use_size_factor_key:
            sf = getattr(x, "size_factor", None)
            if sf is None:
                raise ValueError("this model uses size factors; the minibatch carries none")
            return torch.log(sf.to(dtype).reshape(-1))
        return torch.log(x.library.to(dtype).reshape(-1))

    def inference(self, x, n_samples: int = 1, give_mean: bool = False, eps_noise=None) -> dict:
        """Encode a CSR minibatch.

        ``x`` has ``indptr``, ``indices``, ``values`` and ``library`` (total counts), and
        ``batch`` / ``cat_covs`` / ``cont_covs`` / ``size_factor`` where the model reads them.
        Returns ``q_m``, ``q_v``, ``z`` (``(B, Z)``, or ``(n_samples, B, Z)``),
        ``kl`` (per cell) and ``library`` (``(B,)``, :meth:`log_library`). One sample
        (training) goes through the fused reparameterisation + KL op; ``eps_noise`` fixes its
        noise.
        """
        q_m, raw = self._encode(x)
        library = self.log_library(x, q_m.dtype)
        q_v = posterior_variance(raw)
        if give_mean or n_samples > 1:
            _, kl = F_ops.reparam_kl(q_m, raw, torch.zeros_like(q_m), impl=self.impl)
            if give_mean:
                z = q_m
            elif eps_noise is None:
                z = sample_z(q_m, q_v, n_samples)
            else:
                z = q_m + torch.sqrt(q_v) * eps_noise
        else:
            if eps_noise is None:
                eps_noise = torch.randn_like(q_m)
            z, kl = F_ops.reparam_kl(q_m, raw, eps_noise, impl=self.impl)
        return {"q_m": q_m, "q_v": q_v, "z": z, "kl": kl, "library": library}

    # ---- generative ------------------------------------------------------------
    def generative(self, z: torch.Tensor, batch: torch.Tensor | None, logits: bool = False,
                   cat_covs: torch.Tensor | None = None,
                   cont_covs: torch.Tensor | None = None) -> dict:
        """Decode ``z`` (``(B, Z)`` or ``(S, B, Z)``): the last hidden layer and ``px_r``.

        ``batch`` ``(B,)`` codes, ``cat_covs`` ``(B, n_cats)`` and ``cont_covs``
        ``(B, n_cont)`` where the model has them (:meth:`covariates_of` a minibatch).
        ``"hidden"`` is the input of the output layer; with ``logits=True`` the dict also holds
        ``"logits"``, the output layer applied to it (``B x G``: what analysis needs; the loss
        never forms it, see :meth:`loss`).
        """
        lead = z.shape[:-1]
        z2 = z.reshape(-1, z.shape[-1])
        n = z2.shape[0]
        if batch is not None:
            batch = _tile(batch.reshape(-1), n)
        codes = self.covariate_codes(batch, None if cat_covs is None else _tile(cat_covs, n))
        cont = self._continuous(cont_covs)
        if cont is not None:
            cont = _tile(cont.to(z2.dtype), n)
        h = self.decoder.hidden(z2, codes, cont)
        out = {"hidden": h.reshape(*lead, -1), "px_r": self.px_r}
        if logits:
            out["logits"] = self.decoder.scale(h).reshape(*lead, -1)
        return out

    # ---- loss --------------------------------------------------------------------
    def loss(self, x, inference_outputs: dict, generative_outputs: dict, kl_weight: float = 1.0):
        """Per-cell reconstruction loss and KL, and the KL-weighted mean to minimise.

        The decoder's output layer and the NB likelihood run as one op
        (:func:`scvi_fast.functional.nb_softmax_loglik_linear`) from ``"hidden"``, so the
        ``B x G`` logits are never materialised here (the native back-end keeps them in reused
        buffers; bf16 logits are evaluated in fp32). With ``use_size_factor_key`` the scale is
        scvi-tools' softplus, not a softmax: the likelihood is then evaluated unfused on the
        densified minibatch (:func:`scvi_fast.reference.log_nb_positive`).
        """
        scale = self.decoder.scale
        if self.use_size_factor_key:
            rho = self.px_scale(scale(generative_outputs["hidden"]))
            mu = torch.exp(inference_outputs["library"]).unsqueeze(-1).to(rho.dtype) * rho
            idx, val = csr_masked(x.indptr, x.indices, x.values.to(rho.dtype))
            counts = csr_to_dense(x.indptr, idx, val, self.n_input)
            theta = torch.exp(generative_outputs["px_r"]).to(rho.dtype)
            rec = -log_nb_positive(counts, mu, theta).sum(-1)
        else:
            rec = -F_ops.nb_softmax_loglik_linear(
                generative_outputs["hidden"], scale.weight, scale.bias,
                inference_outputs["library"], generative_outputs["px_r"], x, impl=self.impl,
            )
        kl = inference_outputs["kl"]
        return LossOutput(loss=(rec + kl_weight * kl).mean(), reconstruction_loss=rec, kl_local=kl)

    def forward(self, x, kl_weight: float = 1.0, eps_noise=None):
        """Inference, decoder and loss of a CSR minibatch: ``(inference, generative, loss)``,
        the same as ``loss(x, inf, generative(inf["z"], x.batch, **covariates_of(x)))``."""
        inf = self.inference(x, eps_noise=eps_noise)
        gen = self.generative(inf["z"], x.batch, **self.covariates_of(x))
        return inf, gen, self.loss(x, inf, gen, kl_weight)

    # ---- derived quantities --------------------------------------------------------
    def px_scale(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalised expression (what scvi-tools calls px_scale): ``rho = softmax(logits)``,
        or ``softplus(logits)`` for a model with ``use_size_factor_key`` (as scvi-tools)."""
        if self.use_size_factor_key:
            return torch.nn.functional.softplus(fp32(logits))
        return torch.softmax(fp32(logits), dim=-1)

    def decode_scale(self, z: torch.Tensor, batch: torch.Tensor | None,
                     cat_covs: torch.Tensor | None = None,
                     cont_covs: torch.Tensor | None = None) -> torch.Tensor:
        """``rho`` (:meth:`px_scale`) of ``decoder(z, batch)`` for ``z`` of shape ``(R, Z)``
        and codes ``(R,)`` (covariates as in :meth:`generative`)."""
        return self.px_scale(self.generative(z, batch, logits=True, cat_covs=cat_covs,
                                             cont_covs=cont_covs)["logits"])
