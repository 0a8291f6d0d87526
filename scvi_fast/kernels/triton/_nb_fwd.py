"""Forward of the fused softmax + NB log-likelihood (see :mod:`._nb_loglik` for the math).

One program per (cell, chunk of ``CHUNK`` genes) holding its chunk in registers. When one
chunk covers the row (the default up to 16384 genes) the program computes the log-sum-exp, the
dense terms and the non-zero terms of its cell from one read of the row. With several chunks
per row (``SPLIT``), a first kernel writes each chunk's max and ``sum exp(z - max)``; the main
kernel combines them into the row's ``lse``, rereads its chunk (from L2) and adds the dense
terms and the non-zeros whose gene falls in the chunk; a small kernel sums the chunks'
partials per cell. Which is faster (one read by ``B`` programs, or more programs and a second
read) is measured (see :mod:`._configs`). It saves ``lse`` and ``C`` (two floats per cell) for
the backward (:mod:`._nb_bwd`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from scvi_fast.kernels.triton._common import acc_dtype, block_size, torch_acc_dtype
from scvi_fast.kernels.triton._configs import choose, unique
from scvi_fast.kernels.triton._csr import entry_genes, row_span
from scvi_fast.kernels.triton._math import exp, lgamma, log

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
def _nb_fwd_nonzero_terms(
    z_row, px_r_ptr, indices_ptr, values_ptr, start, end, lo, hi, lib, lse,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """The parts at the non-zeros of one cell, for its stored entries ``start .. end - 1``
    with a gene in ``[lo, hi)``: the sums of the x-term and lgamma terms of the
    log-likelihood, and of ``c - c0 = x mu / (mu + eps) - x mu / D``."""
    ll_nz = tl.zeros([BLOCK_NZ], ACC)
    c_nz = tl.zeros([BLOCK_NZ], ACC)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        g, kmask = entry_genes(indices_ptr, ks, end, lo, hi)
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
    return tl.sum(ll_nz, axis=0), tl.sum(c_nz, axis=0)


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
    ll_nz, c_nz = _nb_fwd_nonzero_terms(
        z_row, px_r_ptr, indices_ptr, values_ptr, start, end, c0, tl.minimum(c0 + CHUNK, G),
        lib, lse, EPS, ACC, BLOCK_NZ,
    )
    ll += ll_nz
    csum += c_nz
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
    return unique(cands)


COMBINE_CONFIG = dict(BLOCK_B=64, num_warps=4)


# ----------------------------------------------------------------------------- launcher


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
