"""scVI's VAE (scvi-tools ``scvi.module.VAE`` with ``gene_likelihood="nb"``).

Inference: ``log1p`` counts -> encoder -> ``q_m``, ``q_v = exp(raw) + 1e-4`` -> ``z``;
the library is the observed ``log(sum_g x_g)``. Generative: ``[z, batch]`` ->
decoder with the batch injected into every layer -> softmax logits and
``theta = exp(px_r)``. Loss: per-cell ``-log NB(x | exp(l) softmax, theta)`` and
analytic KL. The ``px_dropout`` head and the library encoder of scvi-tools are
never computed (NB does not read them); their weights live in checkpoints only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scvi_fast import functional as F_ops
from scvi_fast.module._layers import CovariateLinear, DenseBlock, OutputLinear, SparseInputLinear


def kl_weight(
    epoch: int,
    n_epochs_kl_warmup: int | None,
    max_kl_weight: float = 1.0,
    min_kl_weight: float = 0.0,
) -> float:
    """KL annealing weight at (0-based) ``epoch``, as scvi-tools' training plan.

    Rises linearly from ``min_kl_weight`` at epoch 0 to ``max_kl_weight`` at
    ``n_epochs_kl_warmup``; constant ``max_kl_weight`` without warm-up.
    """
    if n_epochs_kl_warmup and epoch < n_epochs_kl_warmup:
        return min_kl_weight + (max_kl_weight - min_kl_weight) * epoch / n_epochs_kl_warmup
    return max_kl_weight


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
    """``x -> log1p -> [Linear BN ReLU Dropout] x n_layers -> (q_m, raw q_v)``."""

    def __init__(self, n_input, n_latent, n_hidden, n_layers, dropout_rate, impl):
        super().__init__()
        self.first = SparseInputLinear(n_input, n_hidden, transform="log1p", impl=impl)
        self.linears = nn.ModuleList(
            [CovariateLinear(n_hidden, n_hidden) for _ in range(n_layers - 1)]
        )
        self.blocks = nn.ModuleList(
            [DenseBlock(n_hidden, dropout_rate, impl=impl) for _ in range(n_layers)]
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.var = nn.Linear(n_hidden, n_latent)

    def forward(self, x, need_var: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.blocks[0](self.first(x))
        for linear, block in zip(self.linears, self.blocks[1:]):
            h = block(linear(h))
        return self.mean(h), (self.var(h) if need_var else None)


class Decoder(nn.Module):
    """``[z, onehot(batch)] -> [Linear BN ReLU] x n_layers -> logits (G)``."""

    def __init__(self, n_latent, n_output, n_hidden, n_layers, n_cov):
        super().__init__()
        dims = [n_latent] + [n_hidden] * n_layers
        self.linears = nn.ModuleList(
            [CovariateLinear(dims[i], dims[i + 1], n_cov) for i in range(n_layers)]
        )
        self.blocks = nn.ModuleList([DenseBlock(n_hidden, 0.0) for _ in range(n_layers)])
        self.scale = OutputLinear(n_hidden, n_output)  # column-major weight, see there

    def hidden(self, z: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
        """The last hidden layer, the input of the output layer ``scale``."""
        h = z
        for linear, block in zip(self.linears, self.blocks):
            h = block(linear(h, batch))
        return h

    def forward(self, z: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
        return self.scale(self.hidden(z, batch))


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
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1; got {n_layers}")
        self.n_input, self.n_batch, self.n_labels = n_input, n_batch, n_labels
        self.n_hidden, self.n_latent, self.n_layers = n_hidden, n_latent, n_layers
        self.dropout_rate = dropout_rate
        self._impl = impl
        n_cov = n_batch if n_batch > 1 else 0
        self.encoder = Encoder(n_input, n_latent, n_hidden, n_layers, dropout_rate, impl)
        self.decoder = Decoder(n_latent, n_input, n_hidden, n_layers, n_cov)
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

    def _batch_codes(self, batch: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
        if not self.has_covariates:
            return None
        if batch is None:
            raise ValueError("this model has batch covariates; the minibatch carries none")
        return batch.reshape(-1).to(device=device, dtype=torch.int64)

    # ---- inference -------------------------------------------------------------
    def encode(self, x, need_var: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior mean and variance ``(q_m, q_v)`` only: the encoder, no sampling, no KL.

        With ``need_var=False`` the variance head is skipped and ``q_v`` is None.
        """
        q_m, q_v_raw = self.encoder(x, need_var)
        return q_m.float(), (torch.exp(q_v_raw.float()) + 1e-4 if need_var else None)

    def inference(self, x, n_samples: int = 1, give_mean: bool = False, eps_noise=None) -> dict:
        """Encode a CSR minibatch.

        ``x`` has ``indptr``, ``indices``, ``values`` and ``library`` (total counts).
        Returns ``q_m``, ``q_v``, ``z`` (``(B, Z)``, or ``(n_samples, B, Z)``),
        ``kl`` (per cell) and ``library`` (``(B,)`` log library).
        """
        q_m, q_v_raw = self.encoder(x)
        # Under bf16 autocast the GEMMs run in bf16; sampling and KL stay in fp32.
        q_m, q_v_raw = q_m.float() if q_m.dtype == torch.bfloat16 else q_m, (
            q_v_raw.float() if q_v_raw.dtype == torch.bfloat16 else q_v_raw
        )
        library = torch.log(x.library.to(q_m.dtype).reshape(-1))
        if give_mean:
            z, kl = F_ops.reparam_kl(q_m, q_v_raw, torch.zeros_like(q_m), impl=self.impl)
        else:
            shape = (n_samples, *q_m.shape) if n_samples > 1 else q_m.shape
            if eps_noise is None:
                eps_noise = torch.randn(shape, dtype=q_m.dtype, device=q_m.device)
            if n_samples > 1:
                z = q_m + torch.sqrt(torch.exp(q_v_raw) + 1e-4) * eps_noise
                _, kl = F_ops.reparam_kl(q_m, q_v_raw, torch.zeros_like(q_m), impl=self.impl)
            else:
                z, kl = F_ops.reparam_kl(q_m, q_v_raw, eps_noise, impl=self.impl)
        q_v = torch.exp(q_v_raw) + 1e-4
        return {"q_m": q_m, "q_v": q_v, "z": z, "kl": kl, "library": library}

    # ---- generative ------------------------------------------------------------
    def generative(self, z: torch.Tensor, batch: torch.Tensor | None) -> dict:
        """Decode ``z`` (``(B, Z)`` or ``(S, B, Z)``) to softmax logits and ``px_r``."""
        lead = z.shape[:-1]
        z2 = z.reshape(-1, z.shape[-1])
        codes = self._batch_codes(batch, z2.shape[0], z.device)
        if codes is not None and codes.numel() != z2.shape[0]:
            codes = codes.repeat(z2.shape[0] // codes.numel())
        logits = self.decoder(z2, codes)
        return {"logits": logits.reshape(*lead, -1), "px_r": self.px_r}

    # ---- loss --------------------------------------------------------------------
    def loss(self, x, inference_outputs: dict, generative_outputs: dict, kl_weight: float = 1.0):
        """Per-cell reconstruction loss and KL, and the KL-weighted mean to minimise."""
        # bf16 logits: the likelihood op evaluates them in fp32 (Triton reads them as they are)
        logits = generative_outputs["logits"]
        rec = -F_ops.nb_softmax_loglik(
            logits,
            inference_outputs["library"],
            generative_outputs["px_r"],
            x,
            impl=self.impl,
        )
        kl = inference_outputs["kl"]
        return LossOutput(loss=(rec + kl_weight * kl).mean(), reconstruction_loss=rec, kl_local=kl)

    def forward(self, x, kl_weight: float = 1.0, eps_noise=None):
        """Inference, decoder and loss of a CSR minibatch: ``(inference, generative, loss)``.

        The decoder's output layer and the likelihood run as one op
        (:func:`scvi_fast.functional.nb_softmax_loglik_linear`), so the generative dict holds
        the last hidden layer (``"hidden"``) and ``px_r``, not the ``B x G`` logits; use
        :meth:`generative` for those. The loss is the same as
        ``loss(x, inf, generative(z, batch))``.
        """
        inf = self.inference(x, eps_noise=eps_noise)
        z = inf["z"]
        codes = self._batch_codes(x.batch, z.shape[0], z.device)
        h = self.decoder.hidden(z, codes)
        scale = self.decoder.scale
        rec = -F_ops.nb_softmax_loglik_linear(
            h, scale.weight, scale.bias, inf["library"], self.px_r, x, impl=self.impl
        )
        kl = inf["kl"]
        out = LossOutput(loss=(rec + kl_weight * kl).mean(), reconstruction_loss=rec, kl_local=kl)
        return inf, {"hidden": h, "px_r": self.px_r}, out

    # ---- derived quantities --------------------------------------------------------
    @staticmethod
    def px_scale(logits: torch.Tensor) -> torch.Tensor:
        """Normalised expression ``rho = softmax(logits)`` (what scvi-tools calls px_scale)."""
        return torch.softmax(logits, dim=-1)

    def config(self) -> dict:
        return {
            "n_input": self.n_input,
            "n_batch": self.n_batch,
            "n_labels": self.n_labels,
            "n_hidden": self.n_hidden,
            "n_latent": self.n_latent,
            "n_layers": self.n_layers,
            "dropout_rate": self.dropout_rate,
        }
