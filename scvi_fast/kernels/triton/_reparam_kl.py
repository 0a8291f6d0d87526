"""Fused reparameterised sampling and KL to N(0, I), forward and backward, in Triton.

Forward, per cell ``b`` and latent dimension ``k`` (``s = sqrt(q_v)``)::

    q_v = exp(r) + var_eps                    r = q_v_raw
    z   = m + s * e                           e = eps_noise
    KL  = 1/2 sum_k (q_v + m^2 - 1 - log q_v)

Backward, with upstream gradients ``gz`` (per element) and ``gk`` (per cell)::

    dL/dm = gz + gk * m
    dL/dr = exp(r) * (gz * e / (2 s) + gk * (1 - 1/q_v) / 2)     (d q_v / d r = exp(r))
    dL/de = gz * s

Both directions are one pass over ``(B, Z)`` tiles; nothing but the three inputs is saved
(``q_v`` and ``s`` are recomputed: one exp and one sqrt per element).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from scvi_fast.kernels.triton import interpreting
from scvi_fast.kernels.triton._common import (
    FLOAT_DTYPES,
    acc_dtype,
    block_size,
    check_float,
    check_tensors,
    on_device,
)
from scvi_fast.kernels.triton._math import exp, log, sqrt
from scvi_fast.reference import VAR_EPS

# whether the kernels below are interpreted (fixed when triton.jit decorates them)
_INTERPRETED = interpreting()


@triton.jit
def _reparam_kl_fwd_kernel(
    m_ptr, r_ptr, e_ptr,  # (B, Z) inputs q_m, q_v_raw, eps_noise (row stride = Z)
    z_ptr,  # (B, Z) out: z
    kl_ptr,  # (B,) out: per-cell KL
    B, Z,  # shape
    VAR_EPS: tl.constexpr,  # added to exp(q_v_raw); constexpr so float64 sees the exact value
    ACC: tl.constexpr,  # accumulation dtype (float32, or float64 for float64 inputs)
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_Z: tl.constexpr,  # columns per step of the loop over Z
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    kl = tl.zeros([BLOCK_B], dtype=ACC)
    for z0 in range(0, Z, BLOCK_Z):
        cols = z0 + tl.arange(0, BLOCK_Z)
        mask = row_mask[:, None] & (cols < Z)[None, :]
        offs = rows[:, None] * Z + cols[None, :]
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(ACC)
        q_v = exp(r) + VAR_EPS
        z = m + sqrt(q_v) * e
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
        term = q_v + m * m - 1.0 - log(q_v)
        kl += tl.sum(tl.where(mask, term, 0.0), axis=1)
    tl.store(kl_ptr + rows, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _reparam_kl_bwd_kernel(
    m_ptr, r_ptr, e_ptr,  # (B, Z) the forward inputs (row stride = Z)
    gz_ptr,  # (B, Z) upstream gradient of z (row stride = Z)
    gk_ptr,  # (B,) upstream gradient of the KL
    dm_ptr, dr_ptr, de_ptr,  # (B, Z) out: gradients (each written only when NEED_* is set)
    B, Z,  # shape
    VAR_EPS: tl.constexpr,  # added to exp(q_v_raw); constexpr so float64 sees the exact value
    NEED_DM: tl.constexpr, NEED_DR: tl.constexpr, NEED_DE: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_Z: tl.constexpr,  # columns per step of the loop over Z
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    gk = tl.load(gk_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    for z0 in range(0, Z, BLOCK_Z):
        cols = z0 + tl.arange(0, BLOCK_Z)
        mask = row_mask[:, None] & (cols < Z)[None, :]
        offs = rows[:, None] * Z + cols[None, :]
        gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(ACC)
        if NEED_DM:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(dm_ptr + offs, (gz + gk[:, None] * m).to(dm_ptr.dtype.element_ty), mask=mask)
        if NEED_DR or NEED_DE:
            r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
            e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(ACC)
            ex = exp(r)
            q_v = ex + VAR_EPS
            s = sqrt(q_v)
            if NEED_DR:
                dr = ex * (gz * e / (2.0 * s) + 0.5 * gk[:, None] * (1.0 - 1.0 / q_v))
                tl.store(dr_ptr + offs, dr.to(dr_ptr.dtype.element_ty), mask=mask)
            if NEED_DE:
                tl.store(de_ptr + offs, (gz * s).to(de_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def launch_config(Z: int) -> dict:
    """Tile sizes and warps: ~512 elements per tile (4 per thread), which keeps the float64
    backward (several live temporaries per element) clear of register spills on sm_90."""
    block_z = block_size(Z, 64)
    return dict(BLOCK_B=max(1, 512 // block_z), BLOCK_Z=block_z, num_warps=4)


def reparam_kl_forward(q_m, q_v_raw, eps_noise, var_eps=VAR_EPS):
    """Launch the forward kernel; inputs are contiguous ``(B, Z)``. Returns ``(z, kl)``."""
    B, Z = q_m.shape
    z = torch.empty_like(q_m)
    kl = torch.empty(B, dtype=q_m.dtype, device=q_m.device)
    if B == 0:
        return z, kl
    if Z == 0:
        return z, kl.zero_()
    cfg = launch_config(Z)
    _reparam_kl_fwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        q_m, q_v_raw, eps_noise, z, kl, B, Z, VAR_EPS=var_eps, ACC=acc_dtype(q_m.dtype), **cfg,
    )
    return z, kl


def reparam_kl_backward(q_m, q_v_raw, eps_noise, grad_z, grad_kl, needs, var_eps=VAR_EPS):
    """Launch the backward kernel; ``needs`` = which of (dm, dr, de) to produce."""
    B, Z = q_m.shape
    dm, dr, de = (torch.empty_like(q_m) if n else None for n in needs)
    if B == 0 or Z == 0 or not any(needs):
        return dm, dr, de
    cfg = launch_config(Z)
    dummy = q_m  # never written: its NEED_* flag is off
    _reparam_kl_bwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        q_m, q_v_raw, eps_noise, grad_z, grad_kl,
        dm if dm is not None else dummy,
        dr if dr is not None else dummy,
        de if de is not None else dummy,
        B, Z, VAR_EPS=var_eps,
        NEED_DM=needs[0], NEED_DR=needs[1], NEED_DE=needs[2], ACC=acc_dtype(q_m.dtype), **cfg,
    )
    return dm, dr, de


class ReparamKL(torch.autograd.Function):
    """``(z, kl) = reparam_kl(q_m, q_v_raw, eps_noise)`` with the fused Triton kernels."""

    @staticmethod
    def forward(ctx, q_m, q_v_raw, eps_noise, var_eps):
        z, kl = reparam_kl_forward(q_m, q_v_raw, eps_noise, var_eps)
        ctx.save_for_backward(q_m, q_v_raw, eps_noise)
        ctx.var_eps = var_eps
        return z, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z, grad_kl):
        q_m, q_v_raw, eps_noise = ctx.saved_tensors
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        grad_z = grad_z if grad_z.is_contiguous() else grad_z.contiguous()
        grad_kl = grad_kl if grad_kl.is_contiguous() else grad_kl.contiguous()
        return (*reparam_kl_backward(q_m, q_v_raw, eps_noise, grad_z, grad_kl, needs,
                                     ctx.var_eps), None)


def reparam_kl(q_m, q_v_raw, eps_noise, var_eps=VAR_EPS):
    """``z = q_m + sqrt(exp(q_v_raw) + var_eps) * eps_noise`` and the per-cell KL to N(0, I).

    Same semantics as :func:`scvi_fast.reference.reparam_kl` for ``(B, Z)`` inputs (a leading
    batch of any shape is flattened and restored). Contiguous ``(B, Z)`` inputs of one dtype
    on one device (the training step's) go straight to the kernels: no copies, few checks.
    """
    if (
        q_m.dim() == 2
        and q_m.dtype == q_v_raw.dtype == eps_noise.dtype
        and q_m.dtype in FLOAT_DTYPES
        and q_m.shape == q_v_raw.shape == eps_noise.shape
        and q_m.device == q_v_raw.device == eps_noise.device
        and (q_m.is_cuda or _INTERPRETED)
        and q_m.is_contiguous() and q_v_raw.is_contiguous() and eps_noise.is_contiguous()
    ):
        with on_device(q_m):
            return ReparamKL.apply(q_m, q_v_raw, eps_noise, float(var_eps))
    check_tensors("reparam_kl", _INTERPRETED, q_m=q_m, q_v_raw=q_v_raw, eps_noise=eps_noise)
    check_float("reparam_kl", q_m=q_m, q_v_raw=q_v_raw, eps_noise=eps_noise)
    if not (q_m.shape == q_v_raw.shape == eps_noise.shape):
        raise ValueError(
            "reparam_kl: q_m, q_v_raw and eps_noise must have one shape; got "
            f"{tuple(q_m.shape)}, {tuple(q_v_raw.shape)}, {tuple(eps_noise.shape)}"
        )
    if q_m.dim() == 0:
        raise ValueError("reparam_kl: inputs need at least one (latent) dimension")
    lead, Z = q_m.shape[:-1], q_m.shape[-1]
    dtype = torch.promote_types(torch.promote_types(q_m.dtype, q_v_raw.dtype), eps_noise.dtype)
    flat = [t.to(dtype).reshape(-1, Z).contiguous() for t in (q_m, q_v_raw, eps_noise)]
    with on_device(q_m):
        z, kl = ReparamKL.apply(*flat, float(var_eps))
    return z.reshape(*lead, Z), kl.reshape(lead)
