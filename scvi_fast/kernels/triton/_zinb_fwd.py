"""Forward of the fused softmax + ZINB log-likelihood (see :mod:`._zinb_loglik` for the math).

One program per cell streams its row in steps of ``BLOCK_G`` genes: an online log-sum-exp
(per-lane running max and sum), then the dense zero-count term ``Z`` and ``a0 = -s_z theta mu
/ D`` summed over every gene, then the non-zeros' ``N - Z`` and ``a1 - a0``, where alone lgamma
runs. It saves ``lse`` and ``A = dll/dl`` (two floats per cell) for the backward
(:mod:`._zinb_bwd`). The row is read twice (the second time mostly from L2). ``ZI = False``
is the NB likelihood (no zero inflation), which is how a ``(B, G)`` dispersion runs NB.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from scvi_fast.kernels.triton._common import acc_dtype, block_size, torch_acc_dtype
from scvi_fast.kernels.triton._configs import choose
from scvi_fast.kernels.triton._csr import entry_genes, row_span
from scvi_fast.kernels.triton._math import exp, lgamma, log, log1p

#: finite floor for masked logits: exp(floor - m) is 0 and never exp(-inf + inf)
_FLOOR = tl.constexpr(-1e30)
#: torch's softplus threshold: softplus(y) = y, slope 1, above it (the reference's own form)
_SP_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def softplus(y):
    """``(softplus(y), exp(-|y|))`` as ``F.softplus`` computes it (``y`` above 20)."""
    e = exp(-tl.abs(y))
    sp = tl.maximum(y, 0.0) + log1p(e)
    return tl.where(y > _SP_THRESHOLD, y, sp), e


@triton.jit
def softplus_grad(y, e):
    """``d softplus(y) / dy`` (``sigmoid(y)``, 1 above the threshold), given ``e = exp(-|y|)``."""
    r = 1.0 / (1.0 + e)
    s = tl.where(y >= 0.0, r, e * r)
    return tl.where(y > _SP_THRESHOLD, 1.0, s)


@triton.jit
def zero_terms(theta, mu, pi, EPS: tl.constexpr, ZI: tl.constexpr):
    """At a zero count: ``(Z, s_z, s_u, D, log(theta+eps), log D)`` with ``Z`` the
    log-likelihood, ``s_z = softplus'(nb0 - pi)`` and ``s_u = softplus'(-pi)`` (both 1 for NB)."""
    d = theta + mu + EPS
    lte = log(theta + EPS)
    ld = log(d)
    nb0 = theta * (lte - ld)
    if ZI:
        y = nb0 - pi
        spz, ez = softplus(y)
        spu, eu = softplus(-pi)
        val = spz - spu
        sz = softplus_grad(y, ez)
        su = softplus_grad(-pi, eu)
    else:
        val = nb0
        sz = tl.full(nb0.shape, 1.0, nb0.dtype)
        su = sz
    return val, sz, su, d, lte, ld


@triton.jit
def theta_pi(r_ptr, pi_ptr, offs, mask, ZI: tl.constexpr, ACC: tl.constexpr):
    """``theta = exp(px_r)`` and the dropout logits (0 without zero inflation) at ``offs``
    of one row's ``px_r`` and dropout logits."""
    theta = exp(tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC))
    if ZI:
        pi = tl.load(pi_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        pi = tl.zeros_like(theta)
    return theta, pi


@triton.jit
def nonzero_entries(indices_ptr, values_ptr, z_row, ks, end, G,
                    EPS: tl.constexpr, ACC: tl.constexpr):
    """Of the stored entries ``ks`` of a row: gene ids, the mask of the non-zero counts (the
    reference's zero test is ``x < eps``) with a gene in ``[0, G)``, counts and logits."""
    g, kmask = entry_genes(indices_ptr, ks, end, 0, G)
    x = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
    kmask = kmask & (x >= EPS)
    z = tl.load(z_row + g, mask=kmask, other=0.0).to(ACC)
    return g, kmask, x, z


@triton.jit
def row_lse(z_row, G, ACC: tl.constexpr, BLOCK_G: tl.constexpr):
    """``log sum_g exp(z_g)`` of one row, from one streaming read (per-lane running max)."""
    m_vec = tl.full([BLOCK_G], _FLOOR, ACC)
    s_vec = tl.zeros([BLOCK_G], ACC)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        mask = cols < G
        z = tl.where(mask, tl.load(z_row + cols, mask=mask, other=0.0).to(ACC), _FLOOR)
        m_new = tl.maximum(m_vec, z)
        s_vec = s_vec * exp(m_vec - m_new) + tl.where(mask, exp(z - m_new), 0.0)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    return m + log(tl.sum(s_vec * exp(m_vec - m), axis=0))


@triton.jit
def _zinb_fwd_kernel(
    logits_ptr, logits_row_stride,  # (B, G) decoder logits (column stride 1)
    log_lib_ptr,  # (B,) log library size l
    px_r_ptr,  # (G,) or (B, G) log inverse dispersion; theta = exp(px_r)
    pi_ptr,  # (B, G) dropout logits (read when ZI)
    indptr_ptr, indices_ptr, values_ptr,  # CSR counts: (B + 1,), (capacity,), (capacity,)
    ll_ptr,  # (B,) out: per-cell log-likelihood
    lse_ptr,  # (B,) out, saved: log-sum-exp of the logits
    csum_ptr,  # (B,) out, saved: A = sum_g mu_g dll/dmu_g
    G,  # genes
    EPS: tl.constexpr,  # scvi-tools' eps inside the logs
    ZI: tl.constexpr,  # zero-inflated (else NB)
    PX_ROWS: tl.constexpr,  # px_r is (B, G)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_G: tl.constexpr,  # genes per step of the dense passes
    BLOCK_NZ: tl.constexpr,  # CSR entries per step of the non-zero loop
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_row_stride
    if PX_ROWS:
        r_row = px_r_ptr + row * G
    else:
        r_row = px_r_ptr
    pi_row = pi_ptr + row * G
    lib = exp(tl.load(log_lib_ptr + row).to(ACC))
    lse = row_lse(z_row, G, ACC, BLOCK_G)

    ll_vec = tl.zeros([BLOCK_G], ACC)
    a_vec = tl.zeros([BLOCK_G], ACC)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        mask = cols < G
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(ACC)
        mu = lib * exp(z - lse)
        theta, pi = theta_pi(r_row, pi_row, cols, mask, ZI, ACC)
        val, sz, su, d, lte, ld = zero_terms(theta, mu, pi, EPS, ZI)
        ll_vec += tl.where(mask, val, 0.0)
        a_vec += tl.where(mask, -sz * theta * mu / d, 0.0)

    ll_nz = tl.zeros([BLOCK_NZ], ACC)
    a_nz = tl.zeros([BLOCK_NZ], ACC)
    start, end = row_span(indptr_ptr, row)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        g, kmask, x, z = nonzero_entries(indices_ptr, values_ptr, z_row, ks, end, G, EPS, ACC)
        mu = lib * exp(z - lse)
        theta, pi = theta_pi(r_row, pi_row, g, kmask, ZI, ACC)
        val0, sz, su, d, lte, ld = zero_terms(theta, mu, pi, EPS, ZI)
        val1 = (
            theta * (lte - ld) + x * (log(mu + EPS) - ld)
            + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1.0)
        )
        if ZI:
            spu, eu = softplus(-pi)
            val1 = val1 - spu - pi  # the reference's -softplus(-pi) - pi
        ll_nz += tl.where(kmask, val1 - val0, 0.0)
        # a1 - a0 = x mu/(mu+eps) - x mu/D - (1 - s_z) theta mu / D
        a_nz += tl.where(kmask, x * mu / (mu + EPS) - x * mu / d - (1.0 - sz) * theta * mu / d, 0.0)

    tl.store(ll_ptr + row, tl.sum(ll_vec, axis=0) + tl.sum(ll_nz, axis=0))
    tl.store(lse_ptr + row, lse)
    tl.store(csum_ptr + row, tl.sum(a_vec, axis=0) + tl.sum(a_nz, axis=0))


# ----------------------------------------------------------------------------- configurations


@functools.lru_cache(maxsize=None)
def fwd_candidates(G: int, dtype: torch.dtype) -> tuple[dict, ...]:
    """Forward configurations, the default first: steps of up to 2048 genes (float64: its
    exp / log / lgamma take more registers: 256, so that nothing spills) and 8 warps; untuned
    (no GPU measurement yet)."""
    if dtype == torch.float64:
        return (dict(BLOCK_G=block_size(G, 256), BLOCK_NZ=32, num_warps=4),)
    return (dict(BLOCK_G=block_size(G, 2048), BLOCK_NZ=128, num_warps=8),
            dict(BLOCK_G=block_size(G, 1024), BLOCK_NZ=128, num_warps=4))


# ----------------------------------------------------------------------------- launcher


def zinb_forward(logits, log_library, px_r, pi, indptr, indices, values, eps):
    """Launch the forward kernel. ``pi`` None: NB. Returns ``(ll, lse, csum)`` in the
    accumulation dtype; ``lse`` and ``csum`` feed :func:`~._zinb_bwd.zinb_backward`."""
    B, G = logits.shape
    acc = torch_acc_dtype(logits.dtype)
    dev = logits.device
    ll = torch.empty(B, dtype=acc, device=dev)
    lse = torch.empty(B, dtype=acc, device=dev)
    csum = torch.empty(B, dtype=acc, device=dev)
    if B == 0:
        return ll, lse, csum
    if G == 0:  # no genes: log-likelihood 0, A = 0 (lse = -inf is never used)
        return ll.zero_(), lse.fill_(float("-inf")), csum.zero_()

    def launch(cfg):
        _zinb_fwd_kernel[(B,)](
            logits, logits.stride(0), log_library, px_r, logits if pi is None else pi,
            indptr, indices, values, ll, lse, csum, G,
            EPS=eps, ZI=pi is not None, PX_ROWS=px_r.dim() == 2, ACC=acc_dtype(logits.dtype),
            **cfg,
        )

    launch(choose("zinb_fwd", (B, G, logits.dtype), fwd_candidates(G, logits.dtype), launch, dev))
    return ll, lse, csum
