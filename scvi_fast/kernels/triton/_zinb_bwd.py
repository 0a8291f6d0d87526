"""Backward of the fused softmax + ZINB log-likelihood (see :mod:`._zinb_loglik` for the math).

Two launches, in stream order:

* one program per ``(cells x genes)`` tile recomputes ``mu``, ``nb0`` and the softplus pair
  and writes the zero-count gradients ``dz = w (a0 - rho A)``, ``dpi = w (s_u - s_z)`` and, for
  a ``(B, G)`` dispersion, ``dpx_r = w s_z theta (log(theta+eps) + theta/(theta+eps) - log D
  - theta/D)``; a ``(G,)`` dispersion's gradient is summed over the tile's cells into a
  per-tile-row partial (no atomics);
* one program per cell recomputes its non-zeros and overwrites ``dz``, ``dpi`` and a
  ``(B, G)`` ``dpx_r`` there with their full values (digamma runs only here), writes
  ``dll/dl = w A``, and for a ``(G,)`` dispersion writes each entry's ``w (dpx_r1 - dpx_r0)``
  and gene into per-entry buffers (0 and gene 0 for the padded tail and masked entries) that
  the host sums by gene with ``index_add_``.

Every buffer has a size known on the host (``B``, ``G``, the CSR capacity), so nothing
synchronises with the host and the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from scvi_fast.kernels.triton._common import acc_dtype, torch_acc_dtype
from scvi_fast.kernels.triton._configs import choose
from scvi_fast.kernels.triton._csr import row_span
from scvi_fast.kernels.triton._math import digamma, exp
from scvi_fast.kernels.triton._zinb_fwd import nonzero_entries, theta_pi, zero_terms


@triton.jit
def _zinb_bwd_dense_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr,  # (B,) log library size
    px_r_ptr,  # (G,) or (B, G) log inverse dispersion
    pi_ptr,  # (B, G) dropout logits (read when ZI)
    lse_ptr, csum_ptr,  # (B,) saved by the forward: lse and A
    w_ptr,  # (B,) upstream gradient of the per-cell log-likelihood
    dz_ptr,  # (B, G) out: gradient of the logits (when NEED_DZ)
    dpi_ptr,  # (B, G) out: gradient of the dropout logits (when NEED_DPI)
    dr_ptr,  # out: (B, G) gradient of px_r (PX_ROWS), else (cdiv(B, BLOCK_B), G) partials
    B, G,  # shape
    EPS: tl.constexpr, ZI: tl.constexpr, PX_ROWS: tl.constexpr,
    NEED_DZ: tl.constexpr, NEED_DPI: tl.constexpr, NEED_DR: tl.constexpr,
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
    offs = rows[:, None] * G + cols[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC)[:, None]
    lib = exp(tl.load(log_lib_ptr + rows, mask=rmask, other=0.0).to(ACC))[:, None]
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)[:, None]
    A = tl.load(csum_ptr + rows, mask=rmask, other=0.0).to(ACC)[:, None]
    z = tl.load(
        logits_ptr + rows[:, None] * logits_row_stride + cols[None, :], mask=mask, other=0.0
    ).to(ACC)
    rho = exp(z - lse)
    mu = lib * rho
    if PX_ROWS:
        theta = exp(tl.load(px_r_ptr + offs, mask=mask, other=0.0).to(ACC))
    else:
        theta_g = exp(tl.load(px_r_ptr + cols, mask=cmask, other=0.0).to(ACC))
        theta = tl.broadcast_to(theta_g[None, :], (BLOCK_B, BLOCK_G))
    if ZI:
        pi = tl.load(pi_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        pi = tl.zeros_like(z)
    val, sz, su, d, lte, ld = zero_terms(theta, mu, pi, EPS, ZI)
    if NEED_DZ:
        tl.store(dz_ptr + offs, w * (-sz * theta * mu / d - rho * A), mask=mask)
    if NEED_DPI:
        tl.store(dpi_ptr + offs, w * (su - sz), mask=mask)
    if NEED_DR:
        dr = w * sz * theta * (lte + theta / (theta + EPS) - ld - theta / d)
        if PX_ROWS:
            tl.store(dr_ptr + offs, dr, mask=mask)
        else:
            tl.store(dr_ptr + pid_b * G + cols, tl.sum(tl.where(mask, dr, 0.0), axis=0),
                     mask=cmask)


@triton.jit
def _zinb_bwd_sparse_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr, px_r_ptr, pi_ptr,  # as the dense kernel
    indptr_ptr, indices_ptr, values_ptr,  # CSR counts: (B + 1,), (capacity,), (capacity,)
    lse_ptr, csum_ptr, w_ptr,  # (B,) saved lse and A, upstream gradient
    dz_ptr, dpi_ptr,  # (B, G) out at the non-zeros (when NEED_DZ / NEED_DPI)
    dr_ptr,  # (B, G) out at the non-zeros (PX_ROWS)
    rnz_ptr, gnz_ptr,  # (capacity,) out ((G,) px_r): per entry w (dpx_r1 - dpx_r0) and gene
    dl_ptr,  # (B,) out: gradient of the log library (when NEED_DL)
    G,  # genes
    EPS: tl.constexpr, ZI: tl.constexpr, PX_ROWS: tl.constexpr,
    NEED_DZ: tl.constexpr, NEED_DPI: tl.constexpr, NEED_DR: tl.constexpr,
    NEED_DL: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_NZ: tl.constexpr,  # CSR entries per step
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    if PX_ROWS:
        r_row = px_r_ptr + row * G
    else:
        r_row = px_r_ptr
    lse = tl.load(lse_ptr + row).to(ACC)
    lib = exp(tl.load(log_lib_ptr + row).to(ACC))
    w = tl.load(w_ptr + row).to(ACC)
    A = tl.load(csum_ptr + row).to(ACC)
    if NEED_DL:
        tl.store(dl_ptr + row, w * A)
    start, end = row_span(indptr_ptr, row)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        g, kmask, x, z = nonzero_entries(indices_ptr, values_ptr, z_row, ks, end, G, EPS, ACC)
        rho = exp(z - lse)
        mu = lib * rho
        theta, pi = theta_pi(r_row, pi_ptr + row * G, g, kmask, ZI, ACC)
        val0, sz, su, d, lte, ld = zero_terms(theta, mu, pi, EPS, ZI)
        out = row * G + g
        if NEED_DZ:
            a1 = x * mu / (mu + EPS) - (theta + x) * mu / d
            tl.store(dz_ptr + out, w * (a1 - rho * A), mask=kmask)
        if NEED_DPI:
            # the reference's softplus'(-pi) - 1 (= -sigmoid(pi), 0 where -pi > 20)
            tl.store(dpi_ptr + out, w * (su - 1.0), mask=kmask)
        if NEED_DR:
            base = lte + theta / (theta + EPS) - ld
            dr1 = theta * (base - (theta + x) / d + digamma(x + theta) - digamma(theta))
            if PX_ROWS:
                tl.store(dr_ptr + out, w * dr1, mask=kmask)
            else:
                dr0 = sz * theta * (base - theta / d)
                inside = ks < end
                tl.store(rnz_ptr + ks, tl.where(kmask, w * (dr1 - dr0), 0.0), mask=inside)
                tl.store(gnz_ptr + ks, tl.where(kmask, g, 0), mask=inside)


# ----------------------------------------------------------------------------- configurations


@functools.lru_cache(maxsize=None)
def bwd_dense_candidates(dtype: torch.dtype) -> tuple[dict, ...]:
    """Dense-tile configurations, the default first (untuned: no GPU measurement yet)."""
    if dtype == torch.float64:
        return (dict(BLOCK_B=2, BLOCK_G=256, num_warps=4),)
    return (dict(BLOCK_B=4, BLOCK_G=512, num_warps=4), dict(BLOCK_B=8, BLOCK_G=256, num_warps=4))


@functools.lru_cache(maxsize=None)
def bwd_sparse_candidates(dtype: torch.dtype) -> tuple[dict, ...]:
    if dtype == torch.float64:
        return (dict(BLOCK_NZ=64, num_warps=4),)
    return (dict(BLOCK_NZ=128, num_warps=4), dict(BLOCK_NZ=256, num_warps=8))


# ----------------------------------------------------------------------------- launcher


def zinb_backward(logits, log_library, px_r, pi, indptr, indices, values, lse, csum, w, eps,
                  need_dz, need_dl, need_dr, need_dpi):
    """Launch the backward kernels for upstream gradient ``w`` (``(B,)``, contiguous); ``pi``
    None: NB. Returns ``(dz, dl, dpx_r, dpi)``, None where not needed: ``dz`` in the logits'
    dtype, ``dpi`` in ``pi``'s, ``dpx_r`` in ``px_r``'s (summed in the accumulation dtype)
    and ``dl`` in the accumulation dtype."""
    B, G = logits.shape
    dev = logits.device
    acc = torch_acc_dtype(logits.dtype)
    ACC = acc_dtype(logits.dtype)
    rows_r = px_r.dim() == 2
    need_dpi = need_dpi and pi is not None
    dz = torch.empty(B, G, dtype=logits.dtype, device=dev) if need_dz else None
    dpi = torch.empty(B, G, dtype=pi.dtype, device=dev) if need_dpi else None
    dl = torch.empty(B, dtype=acc, device=dev) if need_dl else None
    cap = indices.numel()
    rnz = gnz = part = dr = None
    flags = dict(EPS=eps, ZI=pi is not None, PX_ROWS=rows_r, NEED_DZ=need_dz,
                 NEED_DPI=need_dpi, NEED_DR=need_dr, ACC=ACC)
    dense_cfg = choose("zinb_bwd_dense", (B, G, logits.dtype), bwd_dense_candidates(logits.dtype))
    if need_dr and rows_r:
        dr = torch.empty(B, G, dtype=px_r.dtype, device=dev)
    elif need_dr:
        part = torch.empty(triton.cdiv(B, dense_cfg["BLOCK_B"]), G, dtype=acc, device=dev)
        rnz = torch.zeros(cap, dtype=acc, device=dev)
        gnz = torch.zeros(cap, dtype=torch.int64, device=dev)
    if B == 0 or G == 0:
        if dl is not None:
            dl.zero_()
        if part is not None:
            part.zero_()
    anchor = logits  # stands in for the pointers a launch does not use
    if B > 0 and G > 0 and (need_dz or need_dpi or need_dr):
        grid = (triton.cdiv(B, dense_cfg["BLOCK_B"]), triton.cdiv(G, dense_cfg["BLOCK_G"]))
        _zinb_bwd_dense_kernel[grid](
            logits, logits.stride(0), log_library, px_r, anchor if pi is None else pi, lse, csum,
            w, anchor if dz is None else dz, anchor if dpi is None else dpi,
            dr if rows_r else (part if part is not None else anchor), B, G,
            **flags, **dense_cfg,
        )
    if B > 0:
        sparse_cfg = choose("zinb_bwd_sparse", (B, G, logits.dtype),
                            bwd_sparse_candidates(logits.dtype))
        _zinb_bwd_sparse_kernel[(B,)](
            logits, logits.stride(0), log_library, px_r, anchor if pi is None else pi,
            indptr, indices, values, lse, csum, w,
            anchor if dz is None else dz, anchor if dpi is None else dpi,
            anchor if dr is None else dr, anchor if rnz is None else rnz,
            indptr if gnz is None else gnz, anchor if dl is None else dl, G,
            NEED_DL=need_dl, **flags, **sparse_cfg,
        )
    if need_dr and not rows_r:
        total = part.sum(0) if part.shape[0] else torch.zeros(G, dtype=acc, device=dev)
        dr = total.index_add_(0, gnz, rnz).to(px_r.dtype)
    return dz, dl, dr, dpi
