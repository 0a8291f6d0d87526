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
px_r terms) and a part at the non-zeros (``x mu/(mu+eps) - x mu/D`` and
``-x/D + digamma(x+theta) - digamma(theta)``); digamma runs over the non-zeros only.

The work is memory-bound: the ``B x G`` logits are read once forward, read once and their
gradient written once backward, and nothing else of that size is touched.

* Forward, one program per (cell, chunk of ``CHUNK`` genes) holding its chunk in registers.
  When one chunk covers the row (the default up to 16384 genes) the program computes the
  log-sum-exp, the dense terms and the non-zero terms of its cell from one read of the row.
  With several chunks per row (``SPLIT``), a first kernel writes each chunk's max and
  ``sum exp(z - max)``; the main kernel combines them into the row's ``lse``, rereads its chunk
  (from L2) and adds the dense terms and the non-zeros whose gene falls in the chunk; a small
  kernel sums the chunks' partials per cell. Which is faster (one read by ``B`` programs, or
  more programs and a second read) is measured (see :mod:`._configs`). It saves ``lse`` and
  ``C`` (two floats per cell).
* Backward: one program per ``(cells x genes)`` tile recomputes ``mu`` and writes ``dz = w (c0
  - rho C)`` and a per-tile-row partial of ``sum_b w_b dll/dpx_r`` at ``x = 0`` (two-stage, no
  atomics); then one program per cell recomputes its non-zeros, overwrites ``dz`` there with the
  full ``w (c - rho C)`` (one rounding, also for bf16 gradients), writes ``dll/dl``, and adds the
  non-zero px_r terms into a per-gene float32 (float64) accumulator with atomic adds: about one
  per non-zero, spread over the genes. A last small kernel sums the partials and the
  accumulator and multiplies by ``theta``. Under ``torch.use_deterministic_algorithms(True)``
  the per-non-zero terms are written out instead and summed by gene with ``index_add_``, whose
  deterministic implementation torch then uses.

CSR contract (see :mod:`scvi_fast.reference._csr`): only entries ``indptr[0] .. indptr[-1]``
are read; ``indices`` / ``values`` may be a longer, padded capacity. Rows must not repeat a
gene (canonical CSR, as the loader and scipy produce): the terms are per entry and not
linear in ``x``. Stored gene ids outside ``[0, G)`` are skipped.

Logits may be float32, float64, bfloat16 or float16; the low-precision ones are read as they
are (no float32 copy), every sum is float32, the log-likelihood comes back in float32 and
the logits' gradient is written in the logits' dtype.
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
from scvi_fast.kernels.triton._math import digamma, exp, lgamma, log
from scvi_fast.reference import csr_parts, csr_to_dense, csr_valid

# whether the kernels below are interpreted (fixed when triton.jit decorates them)
_INTERPRETED = interpreting()

#: finite floor for masked logits: exp(floor - m) is 0 and never exp(-inf + inf)
_FLOOR = tl.constexpr(-1e30)


@triton.jit
def _nb_fwd_chunk_max_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    pm_ptr, ps_ptr,  # (B, NC) out: per chunk, max and sum exp(z - max)
    G, NC,  # genes, chunks per row
    ACC: tl.constexpr,  # accumulation dtype
    CHUNK: tl.constexpr,  # genes per chunk
):
    """First stage of a split forward: the log-sum-exp partials of one (cell, chunk)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    mask = cols < G
    z = tl.load(logits_ptr + row * logits_row_stride + cols, mask=mask, other=0.0).to(ACC)
    z = tl.where(mask, z, _FLOOR)
    m = tl.maximum(tl.max(z, axis=0), _FLOOR)
    s = tl.sum(tl.where(mask, exp(z - m), 0.0), axis=0)
    tl.store(pm_ptr + row * NC + c, m)
    tl.store(ps_ptr + row * NC + c, s)


@triton.jit
def _nb_fwd_dense_terms(px_r_ptr, cols, mask, lib, lse, z, EPS: tl.constexpr, ACC: tl.constexpr):
    """Per column, the dense term ``theta (log(theta+eps) - log D)`` and ``c0 = -theta mu / D``
    (the ``x = 0`` parts) for logits ``z`` of ``cols``; 0 where ``mask`` is off."""
    theta = exp(tl.load(px_r_ptr + cols, mask=mask, other=0.0).to(ACC))
    mu = lib * exp(z - lse)
    d = theta + mu + EPS
    ll = tl.where(mask, theta * (log(theta + EPS) - log(d)), 0.0)
    c0 = tl.where(mask, -theta * mu / d, 0.0)
    return ll, c0


@triton.jit
def _nb_fwd_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr,  # (B,) log library size l
    px_r_ptr,  # (G,) log inverse dispersion; theta = exp(px_r)
    indptr_ptr, indices_ptr, values_ptr,  # CSR counts: (B + 1,), (capacity,), (capacity,)
    pm_ptr, ps_ptr,  # (B, NC) log-sum-exp partials of the chunks (read when SPLIT)
    ll_ptr,  # out: (B,) per-cell log-likelihood, or (B, NC) per-chunk partials when SPLIT
    csum_ptr,  # out, saved: (B,) C = sum_g c_g (see module docstring), or (B, NC) partials
    lse_ptr,  # (B,) out, saved: log-sum-exp of the logits
    G, NC,  # genes, chunks per row
    EPS: tl.constexpr,  # scvi-tools' eps inside the logs (constexpr: exact in float64)
    ACC: tl.constexpr,  # accumulation dtype
    SPLIT: tl.constexpr,  # several chunks per row (NC > 1)
    NC_BLOCK: tl.constexpr,  # power of two >= NC
    CHUNK: tl.constexpr,  # genes per program
    BLOCK_G: tl.constexpr,  # dense terms in steps of BLOCK_G, rereading (L1/L2) when < CHUNK
    BLOCK_NZ: tl.constexpr,  # CSR entries per step of the non-zero loop
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    c0 = c * CHUNK
    z_row = logits_ptr + row * logits_row_stride
    lib = exp(tl.load(log_lib_ptr + row).to(ACC))  # library size exp(l)
    if SPLIT:
        parts = tl.arange(0, NC_BLOCK)
        pmask = parts < NC
        pm = tl.load(pm_ptr + row * NC + parts, mask=pmask, other=_FLOOR)
        ps = tl.load(ps_ptr + row * NC + parts, mask=pmask, other=0.0)
        m = tl.max(pm, axis=0)
        lse = m + log(tl.sum(ps * exp(pm - m), axis=0))
    else:
        # the whole row at once: every load in flight together, one exp per element
        cols = tl.arange(0, CHUNK)
        mask = cols < G
        z = tl.where(mask, tl.load(z_row + cols, mask=mask, other=0.0).to(ACC), _FLOOR)
        m = tl.maximum(tl.max(z, axis=0), _FLOOR)
        lse = m + log(tl.sum(tl.where(mask, exp(z - m), 0.0), axis=0))

    # dense terms at x = 0, from the registers or in steps over the (cached) chunk
    if BLOCK_G >= CHUNK:
        if SPLIT:
            cols = c0 + tl.arange(0, CHUNK)
            mask = cols < G
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(ACC)
        ll_d, c_d = _nb_fwd_dense_terms(px_r_ptr, cols, mask, lib, lse, z, EPS, ACC)
        ll = tl.sum(ll_d, axis=0)
        csum = tl.sum(c_d, axis=0)
    else:
        ll_vec = tl.zeros([BLOCK_G], ACC)
        c_vec = tl.zeros([BLOCK_G], ACC)
        for g0 in range(0, CHUNK, BLOCK_G):
            cols_s = c0 + g0 + tl.arange(0, BLOCK_G)
            mask_s = cols_s < G
            z_s = tl.load(z_row + cols_s, mask=mask_s, other=0.0).to(ACC)
            ll_d, c_d = _nb_fwd_dense_terms(px_r_ptr, cols_s, mask_s, lib, lse, z_s, EPS, ACC)
            ll_vec += ll_d
            c_vec += c_d
        ll = tl.sum(ll_vec, axis=0)
        csum = tl.sum(c_vec, axis=0)

    # non-zeros of this cell in this chunk: x-term, lgamma terms, and the rest of c
    start, end = row_span(indptr_ptr, row)
    ll_nz = tl.zeros([BLOCK_NZ], ACC)
    c_nz = tl.zeros([BLOCK_NZ], ACC)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        g, kmask = entry_genes(indices_ptr, ks, end, c0, tl.minimum(c0 + CHUNK, G))
        x = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
        zk = tl.load(z_row + g, mask=kmask, other=0.0).to(ACC)
        th = exp(tl.load(px_r_ptr + g, mask=kmask, other=0.0).to(ACC))
        muk = lib * exp(zk - lse)
        dk = th + muk + EPS
        term = (
            x * (log(muk + EPS) - log(dk))
            + lgamma(x + th) - lgamma(th) - lgamma(x + 1.0)
        )
        ll_nz += tl.where(kmask, term, 0.0)
        c_nz += tl.where(kmask, x * muk / (muk + EPS) - x * muk / dk, 0.0)

    ll += tl.sum(ll_nz, axis=0)
    csum += tl.sum(c_nz, axis=0)
    if SPLIT:
        tl.store(ll_ptr + row * NC + c, ll)
        tl.store(csum_ptr + row * NC + c, csum)
    else:
        tl.store(ll_ptr + row, ll)
        tl.store(csum_ptr + row, csum)
    if c == 0:
        tl.store(lse_ptr + row, lse)


@triton.jit
def _nb_fwd_combine_kernel(
    ll_part_ptr, csum_part_ptr,  # (B, NC) per-chunk partials
    ll_ptr, csum_ptr,  # (B,) out: their sums over the chunks
    B, NC,  # cells, chunks per row
    NC_BLOCK: tl.constexpr,  # power of two >= NC
    BLOCK_B: tl.constexpr,  # cells per program
):
    """Last stage of a split forward: per-cell sums of the chunks' partials."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    parts = tl.arange(0, NC_BLOCK)
    rmask = rows < B
    mask = rmask[:, None] & (parts < NC)[None, :]
    offs = rows[:, None] * NC + parts[None, :]
    ll = tl.sum(tl.load(ll_part_ptr + offs, mask=mask, other=0.0), axis=1)
    cs = tl.sum(tl.load(csum_part_ptr + offs, mask=mask, other=0.0), axis=1)
    tl.store(ll_ptr + rows, ll, mask=rmask)
    tl.store(csum_ptr + rows, cs, mask=rmask)


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
def fwd_candidates(G: int, dtype: torch.dtype) -> tuple[dict, ...]:
    """Forward configurations, the default first.

    ``CHUNK`` genes per program (one chunk per row up to 16384 genes; smaller chunks split
    the row, see the module docstring); ``BLOCK_G < CHUNK`` computes the dense terms in steps
    that reread the chunk (from L1 / L2, it was just read) instead of holding it all in
    registers. Default: the whole row per program, its log-sum-exp from one read held in
    registers (16 elements per thread at 16 warps), the dense terms in steps of 2048 (fewer
    live registers, so more programs per SM hide the memory latency). The candidates: the
    dense terms from registers (no reread, one program per SM), and split rows (2-8x more
    programs, a second read of each chunk). float64 (tests, references) keeps chunks of 1024:
    its exp / log / lgamma need more registers per element.
    """
    if dtype == torch.float64:
        c = block_size(G, 1024)
        return (dict(CHUNK=c, BLOCK_G=c, BLOCK_NZ=64, num_warps=4),)
    whole = block_size(G, 16384)
    cands = [
        dict(CHUNK=whole, BLOCK_G=min(whole, 2048), BLOCK_NZ=256, num_warps=16),
        dict(CHUNK=whole, BLOCK_G=whole, BLOCK_NZ=512, num_warps=16),
        dict(CHUNK=whole, BLOCK_G=min(whole, 1024), BLOCK_NZ=256, num_warps=8),
    ]
    cands += [dict(CHUNK=c, BLOCK_G=c, BLOCK_NZ=128, num_warps=w)
              for c, w in ((4096, 8), (2048, 4), (1024, 4)) if c < whole]
    if whole > 8192:  # the whole row would not fit in registers with the dense terms
        cands = [c for c in cands if c["BLOCK_G"] < whole or c["CHUNK"] < whole]
    return _unique(cands)


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
    return _unique(cands)


@functools.lru_cache(maxsize=None)
def bwd_sparse_candidates(dtype: torch.dtype) -> tuple[dict, ...]:
    """Per-cell non-zero pass of the backward, the default first."""
    if dtype == torch.float64:
        return (dict(BLOCK_NZ=64, num_warps=4),)
    return (dict(BLOCK_NZ=256, num_warps=4), dict(BLOCK_NZ=128, num_warps=4),
            dict(BLOCK_NZ=512, num_warps=8))


PX_R_CONFIG = dict(BLOCK_P=16, BLOCK_G=128, num_warps=4)
COMBINE_CONFIG = dict(BLOCK_B=64, num_warps=4)


def _unique(cands: list[dict]) -> tuple[dict, ...]:
    """The candidates without repeats (small shapes make some coincide), in order; a tuple,
    since the candidate lists are cached."""
    out = []
    for c in cands:
        if c not in out:
            out.append(c)
    return tuple(out)


# ----------------------------------------------------------------------------- launchers


def nb_forward(logits, log_library, px_r, indptr, indices, values, eps):
    """Launch the forward kernels. Returns ``(ll, lse, csum)`` in the accumulation dtype;
    ``lse`` and ``csum`` feed :func:`nb_backward`."""
    B, G = logits.shape
    acc = torch_acc_dtype(logits.dtype)
    dev = logits.device
    ll = torch.empty(B, dtype=acc, device=dev)
    lse = torch.empty(B, dtype=acc, device=dev)
    csum = torch.empty(B, dtype=acc, device=dev)
    if B == 0:
        return ll, lse, csum
    if G == 0:  # no genes: log-likelihood 0, C = 0 (lse = -inf is never used)
        return ll.zero_(), lse.fill_(float("-inf")), csum.zero_()
    ACC = acc_dtype(logits.dtype)

    def launch(cfg):
        chunk = cfg["CHUNK"]
        nc = triton.cdiv(G, chunk)
        nc_block = max(2, triton.next_power_of_2(nc))
        common = dict(ACC=ACC, CHUNK=chunk)
        main = dict(EPS=eps, NC_BLOCK=nc_block, BLOCK_G=cfg["BLOCK_G"],
                    BLOCK_NZ=cfg["BLOCK_NZ"], num_warps=cfg["num_warps"], **common)
        if nc == 1:
            _nb_fwd_kernel[(B, 1)](
                logits, logits.stride(0), log_library, px_r, indptr, indices, values,
                ll, ll, ll, csum, lse, G, 1, SPLIT=False, **main,
            )
            return
        pm = torch.empty(B, nc, dtype=acc, device=dev)
        ps = torch.empty(B, nc, dtype=acc, device=dev)
        ll_part = torch.empty(B, nc, dtype=acc, device=dev)
        c_part = torch.empty(B, nc, dtype=acc, device=dev)
        _nb_fwd_chunk_max_kernel[(B, nc)](
            logits, logits.stride(0), pm, ps, G, nc, num_warps=cfg["num_warps"], **common
        )
        _nb_fwd_kernel[(B, nc)](
            logits, logits.stride(0), log_library, px_r, indptr, indices, values,
            pm, ps, ll_part, c_part, lse, G, nc, SPLIT=True, **main,
        )
        _nb_fwd_combine_kernel[(triton.cdiv(B, COMBINE_CONFIG["BLOCK_B"]),)](
            ll_part, c_part, ll, csum, B, nc, NC_BLOCK=nc_block, **COMBINE_CONFIG
        )

    cfg = choose("nb_fwd", (B, G, logits.dtype), fwd_candidates(G, logits.dtype), launch, dev)
    launch(cfg)
    return ll, lse, csum


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
        need_dz, need_dl, need_dr = (bool(n) for n in ctx.needs_input_grad[:3])
        w = grad_ll if grad_ll.is_contiguous() else grad_ll.contiguous()
        dz, dl, dpx_r = nb_backward(
            logits, log_library, px_r, indptr, indices, values, lse, csum, w, ctx.eps,
            need_dz, need_dl, need_dr,
        )
        return dz, dl, dpx_r, None, None, None, None


def nb_softmax_loglik(logits, log_library, px_r, X_csr, eps=1e-8):
    """Per-cell NB log-likelihood of CSR counts under ``mu = exp(l) softmax(logits)``.

    Same semantics as :func:`scvi_fast.reference.nb_softmax_loglik` (``logits`` ``(B, G)``,
    ``log_library`` ``(B,)`` or ``(B, 1)``, ``px_r`` ``(G,)``) for canonical CSR counts (no
    repeated gene within a row; a padded tail past ``indptr[-1]`` is ignored). Gradients flow
    to ``logits``, ``px_r`` and ``log_library``. bfloat16 / float16 logits are read as they
    are; the result is float32 (float64 for float64 logits).
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
    if indices.numel() != values.numel():
        raise ValueError(
            f"nb_softmax_loglik: indices ({indices.numel()}) and values ({values.numel()}) "
            "differ in length"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    with on_device(logits):
        return NBSoftmaxLoglik.apply(
            logits, log_library.reshape(B).contiguous(), px_r.reshape(G).contiguous(),
            indptr.contiguous(), indices.contiguous(), values.contiguous(), float(eps),
        )
