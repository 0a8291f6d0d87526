"""Fused softmax + Poisson log-likelihood over CSR counts, in Triton.

With ``log(rate_g) = l + z_g - lse`` and ``sum_g rate_g = exp(l)``, torch's
``Poisson.log_prob`` summed over genes is::

    ll = sum_{x_g>0} [x_g (l + z_g - lse) - lgamma(x_g + 1)] - exp(l)
    dll/dz_k = x_k - rho_k X,     dll/dl = X - exp(l),     X = sum_g x_g

* Forward: one program per cell: the row's log-sum-exp (one streaming read) and the
  non-zeros; saves ``lse`` and ``X``.
* Backward: dense tiles write ``dz = -w rho X``; then one program per cell adds ``w x`` at
  its non-zeros (a rewrite of the full value, ``w (x - rho X)``) and writes ``dll/dl``.

CSR contract and dtypes as :mod:`._zinb_loglik`.
"""

from __future__ import annotations

import functools

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
from scvi_fast.kernels.triton._configs import choose
from scvi_fast.kernels.triton._csr import entry_genes, row_span
from scvi_fast.kernels.triton._math import exp, lgamma
from scvi_fast.kernels.triton._zinb_fwd import row_lse
from scvi_fast.reference import csr_parts

_INTERPRETED = interpreting()


@triton.jit
def _poisson_fwd_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr,  # (B,) log library size l
    indptr_ptr, indices_ptr, values_ptr,  # CSR counts
    ll_ptr, lse_ptr, sumx_ptr,  # (B,) out: log-likelihood; saved lse and X
    G,
    ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    lse = row_lse(z_row, G, ACC, BLOCK_G)
    l = tl.load(log_lib_ptr + row).to(ACC)
    ll = tl.zeros([BLOCK_NZ], ACC)
    xs = tl.zeros([BLOCK_NZ], ACC)
    start, end = row_span(indptr_ptr, row)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        g, kmask = entry_genes(indices_ptr, ks, end, 0, G)
        x = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
        kmask = kmask & (x != 0.0)  # 0 log 0 = 0
        z = tl.load(z_row + g, mask=kmask, other=0.0).to(ACC)
        ll += tl.where(kmask, x * (l + z - lse) - lgamma(x + 1.0), 0.0)
        xs += tl.where(kmask, x, 0.0)
    tl.store(ll_ptr + row, tl.sum(ll, axis=0) - exp(l))
    tl.store(lse_ptr + row, lse)
    tl.store(sumx_ptr + row, tl.sum(xs, axis=0))


@triton.jit
def _poisson_bwd_dense_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits
    lse_ptr, sumx_ptr, w_ptr,  # (B,) saved lse and X, upstream gradient
    dz_ptr,  # (B, G) out
    B, G,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    rmask = rows < B
    mask = rmask[:, None] & (cols < G)[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC)[:, None]
    c = (tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)
         * tl.load(sumx_ptr + rows, mask=rmask, other=0.0).to(ACC))[:, None]
    z = tl.load(
        logits_ptr + rows[:, None] * logits_row_stride + cols[None, :], mask=mask, other=0.0
    ).to(ACC)
    tl.store(dz_ptr + rows[:, None] * G + cols[None, :], -c * exp(z - lse), mask=mask)


@triton.jit
def _poisson_bwd_sparse_kernel(
    logits_ptr, logits_row_stride, log_lib_ptr,
    indptr_ptr, indices_ptr, values_ptr,
    lse_ptr, sumx_ptr, w_ptr,
    dz_ptr,  # (B, G) out at the non-zeros (when NEED_DZ)
    dl_ptr,  # (B,) out (when NEED_DL)
    G,
    NEED_DZ: tl.constexpr, NEED_DL: tl.constexpr,
    ACC: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    lse = tl.load(lse_ptr + row).to(ACC)
    X = tl.load(sumx_ptr + row).to(ACC)
    w = tl.load(w_ptr + row).to(ACC)
    if NEED_DL:
        tl.store(dl_ptr + row, w * (X - exp(tl.load(log_lib_ptr + row).to(ACC))))
    if NEED_DZ:
        start, end = row_span(indptr_ptr, row)
        for k0 in range(start, end, BLOCK_NZ):
            ks = k0 + tl.arange(0, BLOCK_NZ)
            g, kmask = entry_genes(indices_ptr, ks, end, 0, G)
            x = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
            z = tl.load(z_row + g, mask=kmask, other=0.0).to(ACC)
            tl.store(dz_ptr + row * G + g, w * (x - exp(z - lse) * X), mask=kmask)


# ----------------------------------------------------------------------------- configurations


@functools.lru_cache(maxsize=None)
def fwd_candidates(G: int, dtype: torch.dtype) -> tuple[dict, ...]:
    """Forward configurations, the default first (untuned: no GPU measurement yet)."""
    if dtype == torch.float64:
        return (dict(BLOCK_G=block_size(G, 1024), BLOCK_NZ=64, num_warps=4),)
    return (dict(BLOCK_G=block_size(G, 4096), BLOCK_NZ=128, num_warps=8),)


BWD_DENSE_CONFIG = dict(BLOCK_B=4, BLOCK_G=512, num_warps=4)
BWD_SPARSE_CONFIG = dict(BLOCK_NZ=128, num_warps=4)


# ----------------------------------------------------------------------------- launchers


class PoissonSoftmaxLoglik(torch.autograd.Function):
    """Per-cell Poisson log-likelihood of CSR counts; gradients to logits and log_library."""

    @staticmethod
    def forward(ctx, logits, log_library, indptr, indices, values):
        B, G = logits.shape
        acc = torch_acc_dtype(logits.dtype)
        ll, lse, sumx = (torch.empty(B, dtype=acc, device=logits.device) for _ in range(3))
        if B > 0 and G > 0:
            def launch(cfg):
                _poisson_fwd_kernel[(B,)](
                    logits, logits.stride(0), log_library, indptr, indices, values,
                    ll, lse, sumx, G, ACC=acc_dtype(logits.dtype), **cfg,
                )

            launch(choose("poisson_fwd", (B, G, logits.dtype),
                          fwd_candidates(G, logits.dtype), launch, logits.device))
        elif B > 0:  # no genes: a sum over nothing (lse = -inf is never used)
            ll.zero_()
            lse.fill_(float("-inf"))
            sumx.zero_()
        ctx.save_for_backward(logits, log_library, indptr, indices, values, lse, sumx)
        return ll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ll):
        logits, log_library, indptr, indices, values, lse, sumx = ctx.saved_tensors
        need_dz, need_dl = (bool(n) for n in ctx.needs_input_grad[:2])
        B, G = logits.shape
        w = grad_ll.contiguous()
        ACC = acc_dtype(logits.dtype)
        dz = torch.empty(B, G, dtype=logits.dtype, device=logits.device) if need_dz else None
        dl = torch.empty(B, dtype=torch_acc_dtype(logits.dtype), device=logits.device)
        if need_dz and B > 0 and G > 0:
            cfg = BWD_DENSE_CONFIG
            grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(G, cfg["BLOCK_G"]))
            _poisson_bwd_dense_kernel[grid](logits, logits.stride(0), lse, sumx, w, dz, B, G,
                                            ACC=ACC, **cfg)
        if B > 0 and G > 0:
            _poisson_bwd_sparse_kernel[(B,)](
                logits, logits.stride(0), log_library, indptr, indices, values, lse, sumx, w,
                logits if dz is None else dz, dl, G, NEED_DZ=need_dz, NEED_DL=need_dl, ACC=ACC,
                **BWD_SPARSE_CONFIG,
            )
        else:  # no cells or no genes: the log-likelihood is a constant 0
            dl.zero_()
        return dz, (dl if need_dl else None), None, None, None


def poisson_softmax_loglik(logits, log_library, X_csr):
    """Per-cell Poisson log-likelihood of CSR counts under ``rate = exp(l) softmax(logits)``.

    Same semantics as :func:`scvi_fast.reference.poisson_softmax_loglik`. Gradients flow to
    ``logits`` and ``log_library``; bfloat16 / float16 logits are read as they are (float32
    result).
    """
    op = "poisson_softmax_loglik"
    indptr, indices, values = csr_parts(X_csr)
    check_tensors(op, _INTERPRETED, logits=logits, log_library=log_library, indptr=indptr,
                  indices=indices, values=values)
    check_float(op, logits=logits, log_library=log_library)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (B, G); got {tuple(logits.shape)}")
    B, G = logits.shape
    if log_library.numel() != B:
        raise ValueError(f"{op}: log_library has {log_library.numel()} entries for {B} cells")
    if indptr.numel() != B + 1:
        raise ValueError(f"{op}: indptr has {indptr.numel()} entries for {B} cells")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    with on_device(logits):
        return PoissonSoftmaxLoglik.apply(
            logits, log_library.reshape(B).contiguous(), indptr.contiguous(),
            indices.contiguous(), values.contiguous(),
        )
