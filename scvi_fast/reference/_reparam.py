"""Reparameterised Gaussian sampling and its KL to the standard normal prior."""

from __future__ import annotations

import torch

#: scvi-tools' ``var_eps``: added to ``exp(raw)`` so the variance stays positive.
VAR_EPS = 1e-4


def reparam_kl(
    q_m: torch.Tensor, q_v_raw: torch.Tensor, eps_noise: torch.Tensor, var_eps: float = VAR_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = q_m + sqrt(q_v) * eps`` and ``KL(N(q_m, q_v) || N(0, I))`` per cell.

    ``q_v = exp(q_v_raw) + var_eps`` and
    ``KL = 0.5 * sum_k (q_v + q_m^2 - 1 - log q_v)``, which is what
    ``torch.distributions.kl_divergence(Normal(q_m, q_v.sqrt()), Normal(0, 1)).sum(-1)``
    gives in scvi-tools.
    """
    q_v = torch.exp(q_v_raw) + var_eps
    z = q_m + torch.sqrt(q_v) * eps_noise
    kl = 0.5 * (q_v + q_m * q_m - 1.0 - torch.log(q_v)).sum(-1)
    return z, kl
