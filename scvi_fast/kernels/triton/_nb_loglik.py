"""Fused softmax + negative-binomial log-likelihood over CSR counts, in Triton.

Per cell ``b`` (index dropped below), logits ``z_g``, library ``l``, ``theta_g = exp(px_r_g)``::

    lse   = log sum_g exp(z_g)          rho_g = exp(z_g - lse)          mu_g = exp(l) rho_g
    ll    = sum_g theta_g (log(theta_g + eps) - log(theta_g + mu_g + eps))          (dense)
          + sum_{g: x_g > 0} [ x_g (log(mu_g + eps) - log(theta_g + mu_g + eps))
                               + lgamma(x_g + theta_g) - lgamma(theta_g) - lgamma(x_g + 1) ]

which is scvi-tools' ``log_nb_positive`` summed over genes: at ``x_g = 0`` the x-term is zero and
the three lgamma terms cancel exactly, so lgamma runs over the non-zeros only.

Gradients (exact, eps included, so they match autograd of the reference). With ``D_g = theta_g +
mu_g + eps`` and ``c_g = mu_g dll/dmu_g = x_g mu_g / (mu_g + eps) - (theta_g + x_g) mu_g / D_g``
(DESIGN's ``a_g`` with eps), and ``dmu_g/dz_k = mu_g (delta_gk - rho_k)``, ``dmu_g/dl = mu_g``::

    dll/dz_k   = c_k - rho_k C            C = sum_g c_g
    dll/dl     = C
    dll/dpx_r_g = theta_g [ log(theta_g + eps) - log D_g + theta_g/(theta_g + eps) - theta_g/D_g
                            - x_g / D_g + digamma(x_g + theta_g) - digamma(theta_g) ]

Each splits into a dense part (``x = 0``: ``c0_g = -theta_g mu_g / D_g`` and the first four
px_r terms) and a correction at the non-zeros (``x mu/(mu+eps) - x mu/D`` and
``-x/D + digamma(x+theta) - digamma(theta)``); digamma runs over the non-zeros only.

Passes over the ``B x G`` logits (memory-bound: this is what costs):

* forward, one program per cell: pass 1 an online log-sum-exp (per-lane running max and sum);
  pass 2 the dense term and ``sum_g c0_g``; a loop over the cell's CSR entries adds the
  non-zero terms and corrections. It saves ``lse`` and ``C`` (two floats per cell).
* backward, one program per ``(cells x genes)`` tile: recompute ``mu``, write
  ``dz = w (c0 - rho C)`` and a per-tile-row partial of ``sum_b w_b dll/dpx_r`` (reduced over
  tiles afterwards, no atomics); then one program per cell adds the non-zero corrections to
  ``dz`` and writes the per-non-zero px_r terms, summed by gene with ``index_add_``
  (deterministic under ``torch.use_deterministic_algorithms``).

That is 2 reads of the logits forward and 1 read + 1 write backward. Producing ``dz`` in the
forward instead (as fused cross-entropy kernels do) needs ``C`` before ``dz`` can be written
(a third read in the forward), a ``B x G`` buffer, and the px_r gradient still depends on the
upstream gradient per cell, so the backward would read the logits again: 3 reads + 1 write
forward, 2 reads + 1 write backward, for the same saved memory (``dz`` instead of the logits).

CSR rows must not repeat a gene (canonical CSR, as the loader and scipy produce): the terms are
per entry and not linear in ``x``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from scvi_fast.kernels.triton import interpreting
from scvi_fast.kernels.triton._common import (
    acc_dtype,
    block_size,
    check_float,
    check_tensors,
    on_device,
    torch_acc_dtype,
)
from scvi_fast.kernels.triton._math import digamma, exp, lgamma, log
from scvi_fast.reference import csr_parts, csr_to_dense

# whether the kernels below are interpreted (fixed when triton.jit decorates them)
_INTERPRETED = interpreting()


@triton.jit
def _nb_fwd_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr,  # (B,) log library size l
    px_r_ptr,  # (G,) log inverse dispersion; theta = exp(px_r)
    indptr_ptr, indices_ptr, values_ptr,  # CSR counts: (B + 1,), (nnz,), (nnz,)
    ll_ptr,  # (B,) out: per-cell log-likelihood
    lse_ptr,  # (B,) out, saved: log-sum-exp of the logits
    csum_ptr,  # (B,) out, saved: C = sum_g c_g (see module docstring)
    G,  # number of genes
    EPS: tl.constexpr,  # scvi-tools' eps inside the logs (constexpr: exact in float64)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_G: tl.constexpr,  # genes per step of the dense passes
    BLOCK_NZ: tl.constexpr,  # CSR entries per step of the non-zero loop
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    lib = exp(tl.load(log_lib_ptr + row).to(ACC))  # library size exp(l)

    # pass 1: per-lane online log-sum-exp. Lanes start at a finite floor (-1e30) so that a lane
    # that only ever sees masked columns keeps s = 0 and never computes exp(-inf + inf).
    m_vec = tl.full([BLOCK_G], -1e30, ACC)
    s_vec = tl.zeros([BLOCK_G], ACC)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        mask = cols < G
        z = tl.load(z_row + cols, mask=mask, other=-1e30).to(ACC)
        m_new = tl.maximum(m_vec, z)
        s_vec = s_vec * exp(m_vec - m_new) + tl.where(mask, exp(z - m_new), 0.0)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    lse = m + log(tl.sum(s_vec * exp(m_vec - m), axis=0))

    # pass 2: dense term theta (log(theta+eps) - log(D)) and c0 = -theta mu / D, at x = 0
    ll_vec = tl.zeros([BLOCK_G], ACC)
    c_vec = tl.zeros([BLOCK_G], ACC)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        mask = cols < G
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(ACC)
        theta = exp(tl.load(px_r_ptr + cols, mask=mask, other=0.0).to(ACC))
        mu = lib * exp(z - lse)
        d = theta + mu + EPS
        ll_vec += tl.where(mask, theta * (log(theta + EPS) - log(d)), 0.0)
        c_vec += tl.where(mask, -theta * mu / d, 0.0)

    # non-zeros of this cell: x-term, lgamma terms, and the correction to c
    start = tl.load(indptr_ptr + row).to(tl.int64)
    end = tl.load(indptr_ptr + row + 1).to(tl.int64)
    ll_nz = tl.zeros([BLOCK_NZ], ACC)
    c_nz = tl.zeros([BLOCK_NZ], ACC)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        kmask = ks < end
        g = tl.load(indices_ptr + ks, mask=kmask, other=0).to(tl.int64)
        x = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
        z = tl.load(z_row + g, mask=kmask, other=0.0).to(ACC)
        theta = exp(tl.load(px_r_ptr + g, mask=kmask, other=0.0).to(ACC))
        mu = lib * exp(z - lse)
        d = theta + mu + EPS
        term = (
            x * (log(mu + EPS) - log(d))
            + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1.0)
        )
        ll_nz += tl.where(kmask, term, 0.0)
        c_nz += tl.where(kmask, x * mu / (mu + EPS) - x * mu / d, 0.0)

    ll = tl.sum(ll_vec, axis=0) + tl.sum(ll_nz, axis=0)
    tl.store(ll_ptr + row, ll.to(ll_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse)
    tl.store(csum_ptr + row, tl.sum(c_vec, axis=0) + tl.sum(c_nz, axis=0))


@triton.jit
def _nb_bwd_dense_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr,  # (B,) log library size
    px_r_ptr,  # (G,) log inverse dispersion
    lse_ptr, csum_ptr,  # (B,) saved by the forward: lse and C
    w_ptr,  # (B,) upstream gradient of the per-cell log-likelihood
    dz_ptr, dz_row_stride,  # (B, G) out: gradient of the logits, dense part (when NEED_DZ)
    part_ptr,  # (cdiv(B, BLOCK_B), G) out: sum over the tile's cells of w * dll/dtheta at x=0
    B, G,  # shape
    EPS: tl.constexpr,  # scvi-tools' eps
    NEED_DZ: tl.constexpr, NEED_DR: tl.constexpr,  # which gradients to produce
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_B: tl.constexpr,  # cells per tile
    BLOCK_G: tl.constexpr,  # genes per tile
):
    pid_b = tl.program_id(0).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    rmask = rows < B
    cmask = cols < G
    mask = rmask[:, None] & cmask[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC)
    lib = exp(tl.load(log_lib_ptr + rows, mask=rmask, other=0.0).to(ACC))
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)
    z = tl.load(
        logits_ptr + rows[:, None] * logits_row_stride + cols[None, :], mask=mask, other=0.0
    ).to(ACC)
    theta = exp(tl.load(px_r_ptr + cols, mask=cmask, other=0.0).to(ACC))[None, :]
    rho = exp(z - lse[:, None])
    mu = lib[:, None] * rho
    d = theta + mu + EPS
    if NEED_DZ:
        # dz = w (c0 - rho C),  c0 = -theta mu / D
        csum = tl.load(csum_ptr + rows, mask=rmask, other=0.0).to(ACC)
        dz = w[:, None] * (-theta * mu / d - rho * csum[:, None])
        tl.store(
            dz_ptr + rows[:, None] * dz_row_stride + cols[None, :],
            dz.to(dz_ptr.dtype.element_ty),
            mask=mask,
        )
    if NEED_DR:
        # dll/dtheta at x = 0: log(theta+eps) - log D + theta/(theta+eps) - theta/D
        t0 = log(theta + EPS) - log(d) + theta / (theta + EPS) - theta / d
        part = tl.sum(tl.where(mask, w[:, None] * t0, 0.0), axis=0)
        tl.store(part_ptr + pid_b * G + cols, part, mask=cmask)


@triton.jit
def _nb_bwd_sparse_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits
    log_lib_ptr,  # (B,) log library size
    px_r_ptr,  # (G,) log inverse dispersion
    indptr_ptr, indices_ptr, values_ptr,  # CSR counts
    lse_ptr,  # (B,) saved log-sum-exp
    w_ptr,  # (B,) upstream gradient
    dz_ptr, dz_row_stride,  # (B, G) in/out: dense part of dz; the corrections are added
    q_ptr,  # (nnz,) out: w * (dll/dtheta - its x=0 part) for each CSR entry
    EPS: tl.constexpr,  # scvi-tools' eps
    NEED_DZ: tl.constexpr, NEED_DR: tl.constexpr,  # which gradients to produce
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_NZ: tl.constexpr,  # CSR entries per step
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    lse = tl.load(lse_ptr + row).to(ACC)
    lib = exp(tl.load(log_lib_ptr + row).to(ACC))
    w = tl.load(w_ptr + row).to(ACC)
    start = tl.load(indptr_ptr + row).to(tl.int64)
    end = tl.load(indptr_ptr + row + 1).to(tl.int64)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        kmask = ks < end
        g = tl.load(indices_ptr + ks, mask=kmask, other=0).to(tl.int64)
        x = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
        z = tl.load(z_row + g, mask=kmask, other=0.0).to(ACC)
        theta = exp(tl.load(px_r_ptr + g, mask=kmask, other=0.0).to(ACC))
        mu = lib * exp(z - lse)
        d = theta + mu + EPS
        if NEED_DZ:
            # c - c0 = x mu / (mu + eps) - x mu / D; the -rho C part is already in dz
            dz_at = dz_ptr + row * dz_row_stride + g
            old = tl.load(dz_at, mask=kmask, other=0.0).to(ACC)
            new = old + w * (x * mu / (mu + EPS) - x * mu / d)
            tl.store(dz_at, new.to(dz_ptr.dtype.element_ty), mask=kmask)
        if NEED_DR:
            q = w * (digamma(x + theta) - digamma(theta) - x / d)
            tl.store(q_ptr + ks, q, mask=kmask)


def fwd_config(G: int) -> dict:
    """One cell per program, 1024 genes per step over 8 warps (4 per thread)."""
    block_g = block_size(G, 1024)
    return dict(BLOCK_G=block_g, BLOCK_NZ=64, num_warps=8 if block_g >= 1024 else 4)


def bwd_dense_config(G: int) -> dict:
    """(16 cells x 128 genes) tiles over 8 warps: 8 elements per thread keeps the float64
    variant at ~120 registers; 16 cells per tile keeps the px_r partials at B/16 x G."""
    return dict(BLOCK_B=16, BLOCK_G=block_size(G, 128), num_warps=8)


def bwd_sparse_config() -> dict:
    return dict(BLOCK_NZ=64, num_warps=4)


def nb_forward(logits, log_library, px_r, indptr, indices, values, eps):
    """Launch the forward kernel. Returns ``(ll, lse, csum)``; ``lse`` and ``csum`` are in the
    accumulation dtype and feed :func:`nb_backward`."""
    B, G = logits.shape
    acc = torch_acc_dtype(logits.dtype)
    ll = torch.empty(B, dtype=logits.dtype, device=logits.device)
    lse = torch.empty(B, dtype=acc, device=logits.device)
    csum = torch.empty(B, dtype=acc, device=logits.device)
    if B == 0:
        return ll, lse, csum
    _nb_fwd_kernel[(B,)](
        logits, logits.stride(0), log_library, px_r,
        indptr, indices, values,
        ll, lse, csum, G,
        EPS=eps, ACC=acc_dtype(logits.dtype), **fwd_config(G),
    )
    return ll, lse, csum


def nb_backward(
    logits, log_library, px_r, indptr, indices, values, lse, csum, w, eps, need_dz, need_dr
):
    """Launch the backward kernels for upstream gradient ``w`` (per cell).

    Returns ``(dz, dpx_r)`` (None where not needed); ``dpx_r`` in the accumulation dtype.
    """
    B, G = logits.shape
    acc = torch_acc_dtype(logits.dtype)
    dz = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_dz else None
    dpx_r = None
    dense_cfg = bwd_dense_config(G)
    n_row_tiles = triton.cdiv(B, dense_cfg["BLOCK_B"])
    part = torch.empty(n_row_tiles, G, dtype=acc, device=logits.device) if need_dr else None
    q = torch.empty(indices.numel(), dtype=acc, device=logits.device) if need_dr else None
    ACC = acc_dtype(logits.dtype)
    if B > 0 and G > 0 and (need_dz or need_dr):
        _nb_bwd_dense_kernel[(n_row_tiles, triton.cdiv(G, dense_cfg["BLOCK_G"]))](
            logits, logits.stride(0), log_library, px_r, lse, csum, w,
            dz if need_dz else logits, dz.stride(0) if need_dz else 0,
            part if need_dr else lse,
            B, G,
            EPS=eps, NEED_DZ=need_dz, NEED_DR=need_dr, ACC=ACC, **dense_cfg,
        )
        # stream order: the dense part of dz is complete before the corrections are added
        _nb_bwd_sparse_kernel[(B,)](
            logits, logits.stride(0), log_library, px_r,
            indptr, indices, values, lse, w,
            dz if need_dz else logits, dz.stride(0) if need_dz else 0,
            q if need_dr else lse,
            EPS=eps, NEED_DZ=need_dz, NEED_DR=need_dr, ACC=ACC, **bwd_sparse_config(),
        )
    if need_dr:
        theta = torch.exp(px_r.to(acc))
        per_gene = part.sum(0) if B > 0 else torch.zeros(G, dtype=acc, device=logits.device)
        per_gene = per_gene.index_add(0, indices, q)
        dpx_r = theta * per_gene
    return dz, dpx_r


def term_magnitudes(logits, log_library, px_r, X_csr, w, eps=1e-8):
    """For accuracy checks: per output element, the sum of the absolute values of the terms it
    adds up, in float64 (dense ``B x G``: small shapes or a GPU).

    Returns ``[loglik (B,), dlogits (B, G), dlog_library (B,), dpx_r (G,)]`` for upstream
    gradient ``w``. A sum of terms computed with unit roundoff ``u`` is off by at most about
    ``n u`` times this, whatever cancels; the NB sums cancel heavily (lgamma differences at large
    counts, ``theta (log theta - log(theta + mu))`` at large theta), so errors are judged
    against it rather than against the result.
    """
    indptr, indices, values = csr_parts(X_csr)
    z, lib, r = (t.detach().double() for t in (logits, log_library, px_r))
    x = csr_to_dense(indptr, indices, values.double(), z.shape[1])
    rho = torch.softmax(z, -1)
    mu = torch.exp(lib.reshape(-1, 1)) * rho
    th = torch.exp(r.reshape(-1))
    d = th + mu + eps
    nz = x > 0  # lgamma / digamma terms only where the op evaluates them
    lgam = torch.lgamma(x + th).abs() + torch.lgamma(th).abs() + torch.lgamma(x + 1).abs()
    ll = (
        (th * torch.log(th + eps)).abs() + (th * torch.log(d)).abs()
        + (x * torch.log(mu + eps)).abs() + (x * torch.log(d)).abs() + torch.where(nz, lgam, 0)
    ).sum(-1)
    c_abs = x * mu / (mu + eps) + (th + x) * mu / d
    c_sum = c_abs.sum(-1, keepdim=True)
    w = w.detach().double().abs().reshape(-1)
    digam = torch.where(nz, torch.digamma(x + th).abs() + torch.digamma(th).abs(), 0)
    t_abs = (
        torch.log(th + eps).abs() + torch.log(d).abs() + th / (th + eps) + (th + x) / d + x / d
        + digam
    )
    return [
        ll,
        w[:, None] * (c_abs + rho * c_sum),
        w * c_sum[:, 0],
        th * (w[:, None] * t_abs).sum(0),
    ]


class NBSoftmaxLoglik(torch.autograd.Function):
    """Per-cell NB log-likelihood of CSR counts; gradients to logits, log_library and px_r."""

    @staticmethod
    def forward(ctx, logits, log_library, px_r, indptr, indices, values, eps):
        ll, lse, csum = nb_forward(logits, log_library, px_r, indptr, indices, values, eps)
        ctx.save_for_backward(logits, log_library, px_r, indptr, indices, values, lse, csum)
        ctx.eps = eps
        return ll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ll):
        logits, log_library, px_r, indptr, indices, values, lse, csum = ctx.saved_tensors
        need_dz, need_dl, need_dr = ctx.needs_input_grad[:3]
        w = grad_ll.contiguous()
        dz, dpx_r = nb_backward(
            logits, log_library, px_r, indptr, indices, values, lse, csum, w, ctx.eps,
            bool(need_dz), bool(need_dr),
        )
        dl = (w.to(csum.dtype) * csum).to(log_library.dtype) if need_dl else None
        if dpx_r is not None:
            dpx_r = dpx_r.to(px_r.dtype)
        return dz, dl, dpx_r, None, None, None, None


def nb_softmax_loglik(logits, log_library, px_r, X_csr, eps=1e-8):
    """Per-cell NB log-likelihood of CSR counts under ``mu = exp(l) softmax(logits)``.

    Same semantics as :func:`scvi_fast.reference.nb_softmax_loglik` (``logits`` ``(B, G)``,
    ``log_library`` ``(B,)`` or ``(B, 1)``, ``px_r`` ``(G,)``) for canonical CSR counts (no
    repeated gene within a row). Gradients flow to ``logits``, ``px_r`` and ``log_library``.
    """
    indptr, indices, values = csr_parts(X_csr)
    check_tensors(
        "nb_softmax_loglik", _INTERPRETED, logits=logits, log_library=log_library, px_r=px_r,
        indptr=indptr, indices=indices, values=values,
    )
    check_float("nb_softmax_loglik", logits=logits, log_library=log_library, px_r=px_r)
    if logits.dim() != 2:
        raise ValueError(f"nb_softmax_loglik: logits must be (B, G); got {tuple(logits.shape)}")
    B, G = logits.shape
    if log_library.numel() != B:
        raise ValueError(
            f"nb_softmax_loglik: log_library has {log_library.numel()} entries for {B} cells"
        )
    if px_r.numel() != G:
        raise ValueError(f"nb_softmax_loglik: px_r has {px_r.numel()} entries for {G} genes")
    if indptr.numel() != B + 1:
        raise ValueError(f"nb_softmax_loglik: indptr has {indptr.numel()} entries for {B} cells")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    with on_device(logits):
        return NBSoftmaxLoglik.apply(
            logits, log_library.reshape(B).contiguous(), px_r.reshape(G).contiguous(),
            indptr.contiguous(), indices.contiguous(), values.contiguous(), float(eps),
        )
