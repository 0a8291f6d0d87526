"""Reparameterised sampling and its KL to N(0, I), fused, on the CPU.

Forward (one pass): ``q_v = exp(raw) + var_eps``, ``z = q_m + sqrt(q_v) * eps``,
``KL_b = 0.5 * sum_k (q_v + q_m^2 - 1 - log q_v)``.
Backward, from upstream ``dz`` and ``dKL`` (recomputing ``exp(raw)``):
``dq_m = dz + dKL * q_m`` and
``dq_v_raw = exp(raw) * (dz * eps / (2 sqrt(q_v)) + dKL * (1 - 1/q_v) / 2)``.
No gradient to the noise.
"""

from __future__ import annotations

import math

import torch

from scvi_fast._native import load
from scvi_fast.reference import VAR_EPS


class ReparamKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_m, q_v_raw, eps_noise, var_eps):
        z, kl = load().reparam_kl_forward(q_m, q_v_raw, eps_noise, var_eps)
        ctx.save_for_backward(q_m, q_v_raw, eps_noise)
        ctx.var_eps = var_eps
        return z, kl

    @staticmethod
    def backward(ctx, dz, dkl):
        need_m, need_v = ctx.needs_input_grad[:2]
        if not (need_m or need_v):
            return None, None, None, None
        q_m, q_v_raw, eps_noise = ctx.saved_tensors
        dq_m, dq_v_raw = load().reparam_kl_backward(
            q_m,
            q_v_raw,
            eps_noise,
            ctx.var_eps,
            dz.contiguous() if dz is not None else None,
            dkl.contiguous() if dkl is not None else None,
            need_m,
            need_v,
        )
        return (dq_m if need_m else None), (dq_v_raw if need_v else None), None, None


def reparam_kl(
    q_m: torch.Tensor, q_v_raw: torch.Tensor, eps_noise: torch.Tensor, var_eps: float = VAR_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native version of :func:`scvi_fast.reference.reparam_kl` (same arguments).

    Any leading shape ``(..., Z)`` is accepted; the kernel sees ``(-1, Z)``.
    """
    shape = q_m.shape
    rows = math.prod(shape[:-1])
    z, kl = ReparamKLFunction.apply(
        q_m.reshape(rows, shape[-1]).contiguous(),
        q_v_raw.reshape(rows, shape[-1]).contiguous(),
        eps_noise.to(q_m.dtype).reshape(rows, shape[-1]).contiguous(),
        float(var_eps),
    )
    return z.reshape(shape), kl.reshape(shape[:-1])
