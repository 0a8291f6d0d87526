"""Backward of the fused softmax + NB log-likelihood (see :mod:`._nb_loglik` for the math).

One program per ``(cells x genes)`` tile recomputes ``mu`` and writes ``dz = w (c0 - rho C)``
and a per-tile-row partial of ``sum_b w_b dll/dpx_r`` at ``x = 0`` (two-stage, no atomics);
then one program per cell recomputes its non-zeros, overwrites ``dz`` there with the full
``w (c - rho C)`` (one rounding, also for bf16 gradients), writes ``dll/dl``, and adds the
non-zero px_r terms into a per-gene float32 (float64) accumulator with atomic adds: about one
per non-zero, spread over the genes. A last small kernel sums the partials and the accumulator
and multiplies by ``theta``. Under ``torch.use_deterministic_algorithms(True)`` the
per-non-zero terms are written out instead and summed by gene with ``index_add_``, whose
deterministic implementation torch then uses.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from scvi_fast.kernels.triton._common import acc_dtype, block_size, torch_acc_dtype
from scvi_fast.kernels.triton._configs import choose, unique
from scvi_fast.kernels.triton._csr import entry_genes, row_span
from scvi_fast.kernels.triton._math import digamma, exp, log
from scvi_fast.reference import csr_valid


@triton.jit
def _nb_bwd_dense_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr,  # (B,) log library size
    px_r_ptr,  # (G,) log inverse dispersion
    lse_ptr, csum_ptr,  # (B,) saved by the forward: lse and C
    w_ptr,  # (B,) upstream gradient of the per-cell log-likelihood
    dz_ptr, dz_row_stride,  # (B, G) out: gradient of the logits, dense part (when NEED_DZ)
    part_ptr,  # (cdiv(B, BLOCK_B), G) out: sum over the tile's cells of w * dll/dtheta at x=0
    acc_ptr,  # (G,) per-gene accumulator of the non-zero terms: zeroed here (when ZERO_ACC)
    B, G,  # shape
    EPS: tl.constexpr,  # scvi-tools' eps
    NEED_DZ: tl.constexpr, NEED_DR: tl.constexpr,  # which gradients to produce
    ZERO_ACC: tl.constexpr,  # zero acc (the sparse kernel, launched next, adds into it)
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
        if ZERO_ACC:
            if pid_b == 0:
                tl.store(acc_ptr + cols, tl.zeros([BLOCK_G], ACC), mask=cmask)


@triton.jit
def _nb_bwd_sparse_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits
    log_lib_ptr,  # (B,) log library size
    px_r_ptr,  # (G,) log inverse dispersion
    indptr_ptr, indices_ptr, values_ptr,  # CSR counts
    lse_ptr, csum_ptr,  # (B,) saved log-sum-exp and C
    w_ptr,  # (B,) upstream gradient
    dz_ptr, dz_row_stride,  # (B, G) in/out: dz, overwritten at the non-zeros (when NEED_DZ)
    dl_ptr,  # (B,) out: gradient of log_library, w C (when NEED_DL)
    acc_ptr,  # (G,) in/out when ATOMIC: += w (dll/dtheta - its x=0 part) of each non-zero
    q_ptr,  # (capacity,) out when not ATOMIC: the same term per CSR entry
    G,  # genes
    EPS: tl.constexpr,  # scvi-tools' eps
    NEED_DZ: tl.constexpr, NEED_DL: tl.constexpr, NEED_DR: tl.constexpr,  # gradients to produce
    ATOMIC: tl.constexpr,  # px_r terms by atomic add into acc (else written to q)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_NZ: tl.constexpr,  # CSR entries per step
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    w = tl.load(w_ptr + row).to(ACC)
    csum = tl.load(csum_ptr + row).to(ACC)
    if NEED_DL:
        tl.store(dl_ptr + row, (w * csum).to(dl_ptr.dtype.element_ty))
    if NEED_DZ or NEED_DR:
        lse = tl.load(lse_ptr + row).to(ACC)
        lib = exp(tl.load(log_lib_ptr + row).to(ACC))
        start, end = row_span(indptr_ptr, row)
        for k0 in range(start, end, BLOCK_NZ):
            ks = k0 + tl.arange(0, BLOCK_NZ)
            g, kmask = entry_genes(indices_ptr, ks, end, 0, G)
            x = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
            z = tl.load(z_row + g, mask=kmask, other=0.0).to(ACC)
            theta = exp(tl.load(px_r_ptr + g, mask=kmask, other=0.0).to(ACC))
            rho = exp(z - lse)
            mu = lib * rho
            d = theta + mu + EPS
            if NEED_DZ:
                # the whole gradient at a non-zero, c - rho C, replaces the dense part
                c = x * mu / (mu + EPS) - (theta + x) * mu / d
                dz = w * (c - rho * csum)
                tl.store(dz_ptr + row * dz_row_stride + g, dz.to(dz_ptr.dtype.element_ty),
                         mask=kmask)
            if NEED_DR:
                q = w * (digamma(x + theta) - digamma(theta) - x / d)
                if ATOMIC:
                    tl.atomic_add(acc_ptr + g, q, mask=kmask, sem="relaxed")
                else:
                    tl.store(q_ptr + ks, q, mask=kmask)


@triton.jit
def _nb_bwd_px_r_kernel(
    part_ptr,  # (P, G) dense partials from the tile kernel
    acc_ptr,  # (G,) per-gene sum of the non-zero terms
    px_r_ptr,  # (G,) log inverse dispersion
    out_ptr,  # (G,) out: dll/dpx_r = theta * (sum of partials + acc), in px_r's dtype
    P, G,  # partial rows, genes
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_P: tl.constexpr,  # partial rows per step
    BLOCK_G: tl.constexpr,  # genes per program
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cmask = cols < G
    total = tl.zeros([BLOCK_P, BLOCK_G], ACC)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps < P)[:, None] & cmask[None, :]
        total += tl.load(part_ptr + ps[:, None] * G + cols[None, :], mask=m, other=0.0)
    s = tl.sum(total, axis=0) + tl.load(acc_ptr + cols, mask=cmask, other=0.0)
    theta = exp(tl.load(px_r_ptr + cols, mask=cmask, other=0.0).to(ACC))
    tl.store(out_ptr + cols, (theta * s).to(out_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- configurations


@functools.lru_cache(maxsize=None)
def bwd_dense_candidates(G: int, dtype: torch.dtype) -> tuple[dict, ...]:
    """Backward tile configurations, the default first: (16 cells x 128 genes) over 8 warps,
    8 elements per thread (the float64 variant stays at ~120 registers); 16 cells per tile
    keeps the px_r partials at B/16 x G."""
    bg = block_size(G, 128)
    cands = [dict(BLOCK_B=16, BLOCK_G=bg, num_warps=8)]
    if dtype != torch.float64:
        cands += [dict(BLOCK_B=16, BLOCK_G=block_size(G, 256), num_warps=8),
                  dict(BLOCK_B=32, BLOCK_G=bg, num_warps=8),
                  dict(BLOCK_B=8, BLOCK_G=block_size(G, 256), num_warps=4),
                  dict(BLOCK_B=32, BLOCK_G=block_size(G, 256), num_warps=16)]
    return unique(cands)


@functools.lru_cache(maxsize=None)
def bwd_sparse_candidates(dtype: torch.dtype) -> tuple[dict, ...]:
    """Per-cell non-zero pass of the backward, the default first."""
    if dtype == torch.float64:
        return (dict(BLOCK_NZ=64, num_warps=4),)
    return (dict(BLOCK_NZ=256, num_warps=4), dict(BLOCK_NZ=128, num_warps=4),
            dict(BLOCK_NZ=512, num_warps=8))


PX_R_CONFIG = dict(BLOCK_P=16, BLOCK_G=128, num_warps=4)


# ----------------------------------------------------------------------------- launcher


def nb_backward(
    logits, log_library, px_r, indptr, indices, values, lse, csum, w, eps,
    need_dz, need_dl, need_dr,
):
    """Launch the backward kernels for upstream gradient ``w`` (per cell).

    Returns ``(dz, dl, dpx_r)`` (None where not needed): ``dz`` in the logits' dtype, ``dl``
    in ``log_library``'s and ``dpx_r`` in ``px_r``'s.
    """
    B, G = logits.shape
    dev = logits.device
    acc = torch_acc_dtype(logits.dtype)
    ACC = acc_dtype(logits.dtype)
    dz = torch.empty(B, G, dtype=logits.dtype, device=dev) if need_dz else None
    dl = torch.empty(B, dtype=log_library.dtype, device=dev) if need_dl else None
    dpx_r = torch.empty(G, dtype=px_r.dtype, device=dev) if need_dr else None
    if B == 0 or G == 0:
        if need_dl:
            dl.zero_()
        if need_dr:
            dpx_r.zero_()
        return dz, dl, dpx_r
    atomic = not torch.are_deterministic_algorithms_enabled()
    per_gene = torch.empty(G, dtype=acc, device=dev) if need_dr else None
    q = None
    if need_dr and not atomic:
        q = torch.zeros(indices.numel(), dtype=acc, device=dev)
    dense_cfg = None
    part = None
    if need_dz or need_dr:
        def launch_dense(cfg):
            n_tiles = triton.cdiv(B, cfg["BLOCK_B"])
            out = torch.empty(n_tiles, G, dtype=acc, device=dev) if need_dr else lse
            _nb_bwd_dense_kernel[(n_tiles, triton.cdiv(G, cfg["BLOCK_G"]))](
                logits, logits.stride(0), log_library, px_r, lse, csum, w,
                dz if need_dz else logits, dz.stride(0) if need_dz else 0,
                out, per_gene if need_dr else lse,
                B, G,
                EPS=eps, NEED_DZ=need_dz, NEED_DR=need_dr, ZERO_ACC=need_dr and atomic,
                ACC=ACC, **cfg,
            )
            return out

        dense_cfg = choose("nb_bwd_dense", (B, G, logits.dtype, need_dz, need_dr),
                           bwd_dense_candidates(G, logits.dtype), launch_dense, dev)
        part = launch_dense(dense_cfg)

    def launch_sparse(cfg):
        # stream order: the dense part of dz (and the zeroed accumulator) come first
        _nb_bwd_sparse_kernel[(B,)](
            logits, logits.stride(0), log_library, px_r,
            indptr, indices, values, lse, csum, w,
            dz if need_dz else logits, dz.stride(0) if need_dz else 0,
            dl if need_dl else lse,
            per_gene if (need_dr and atomic) else lse,
            q if q is not None else lse,
            G,
            EPS=eps, NEED_DZ=need_dz, NEED_DL=need_dl, NEED_DR=need_dr, ATOMIC=atomic,
            ACC=ACC, **cfg,
        )

    # timing repeats of the sparse pass would add into the accumulator again: no bench
    sparse_cfg = choose("nb_bwd_sparse", (B, G, logits.dtype),
                        bwd_sparse_candidates(logits.dtype))
    launch_sparse(sparse_cfg)
    if need_dr:
        if not atomic:
            valid = csr_valid(indptr, indices.numel()) & (indices >= 0) & (indices < G)
            idx = torch.where(valid, indices.to(torch.int64), 0)
            per_gene = torch.zeros(G, dtype=acc, device=dev).index_add_(0, idx, q)
        _nb_bwd_px_r_kernel[(triton.cdiv(G, PX_R_CONFIG["BLOCK_G"]),)](
            part, per_gene, px_r, dpx_r, part.shape[0], G, ACC=ACC, **PX_R_CONFIG,
        )
    return dz, dl, dpx_r
