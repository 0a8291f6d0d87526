"""The posterior of ``z`` and the loss record: dtype handling, variance, sampling, KL warm-up
(shared by the VAE, the trainer and every sampler in analysis)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scvi_fast.reference import VAR_EPS


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

    loss: torch.Tensor  #: mean over cells of ``reconst + kl_weight * kl_z + kl_l``
    reconstruction_loss: torch.Tensor  #: ``(B,)`` negative log-likelihood
    kl_local: torch.Tensor  #: ``(B,)`` ``kl_z + kl_l`` (scvi-tools' summed ``kl_local``)
    kl_z: torch.Tensor | None = None  #: ``(B,)`` KL(q(z|x) || N(0, I))
    kl_l: torch.Tensor | None = None  #: ``(B,)`` KL(q(l|x) || p(l)); None: observed library

    @property
    def n_obs(self) -> int:
        return int(self.reconstruction_loss.shape[0])
