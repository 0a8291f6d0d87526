"""Math shared by the kernels: ``exp`` / ``log`` / ``log1p``, and ``lgamma`` / ``digamma`` in
plain Triton for positive arguments.

``lgamma`` and ``digamma`` use ``log`` and arithmetic only, so they run on every Triton target
and under ``TRITON_INTERPRET=1`` (which cannot call libdevice). Both use the same scheme:

1. shift the argument up with the recurrence until it is at least ``SHIFT = 12``::

       lgamma(x)  = lgamma(x + n) - log(x (x+1) ... (x+n-1))
       digamma(x) = digamma(x + n) - sum_{i<n} 1 / (x + i)

   (vectorised: every lane with ``x < 12`` takes exactly ``n = 12`` steps);
2. evaluate the asymptotic (Stirling / de Moivre) series at ``y >= 12``::

       lgamma(y)  = (y - 1/2) log y - y + log(2 pi)/2 + sum_k B_2k / (2k (2k-1) y^(2k-1))
       digamma(y) = log y - 1/(2y) - sum_k B_2k / (2k y^(2k))

   truncated after ``B_12``; the first omitted terms are ``1/(156 y^13)`` and ``1/(12 y^14)``,
   below ``1e-16`` relative at ``y = 12``, so the series is float64-accurate.

The product of the twelve shift factors stays below ``24! / 12! ~ 1.3e15`` for ``x < 12``,
far from overflow even in float32. Accuracy is absolute near the roots of lgamma (x = 1, 2)
and of digamma (x ~ 1.46): a few ulp of ``lgamma(12) ~ 17.5``, which is what the NB
log-likelihood needs (it sums lgamma differences, so absolute error is what reaches the loss).
Arguments must be positive (counts plus ``theta > 0``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from scvi_fast.kernels.triton import interpreting

# Compiled: exp / log / log1p from libdevice, as torch's CUDA kernels use. Triton's own float32
# tl.exp is ex2.approx(x * log2 e), off by up to ~|x| * 6e-8 relative (1e-6 at x = -20, a common
# z - lse) against ~1 ulp for libdevice; on a memory-bound kernel the precise version is free.
# The interpreter has no libdevice: it takes the tl.* path (numpy, correctly rounded anyway).
_LIBDEVICE = tl.constexpr(not interpreting())


@triton.jit
def exp(x):
    """``exp(x)``, element-wise (libdevice when compiled)."""
    if _LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def log(x):
    """``log(x)``, element-wise (libdevice when compiled)."""
    if _LIBDEVICE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def sqrt(x):
    """``sqrt(x)``, correctly rounded (float32 tl.sqrt may lower to an approximation)."""
    if x.dtype == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def log1p(x):
    """``log(1 + x)`` accurate for small ``x`` (libdevice when compiled; else Goldberg's
    ``log(u) * x / (u - 1)`` with ``u = 1 + x``, where the rounding of ``u`` cancels in the
    ratio; exact 0 at ``x = 0``)."""
    if _LIBDEVICE:
        y = libdevice.log1p(x)
    else:
        u = 1.0 + x
        d = u - 1.0
        y = tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))
    return y


@triton.jit
def lgamma(x):
    """``log Gamma(x)`` for ``x > 0``, element-wise, in the dtype of ``x``."""
    small = x < 12.0
    # prod_{i<12} (x + i), only where x < 12 (elsewhere the product would overflow in float32)
    xs = tl.where(small, x, 1.0)
    p = xs
    for i in tl.static_range(1, 12):
        p = p * (xs + i)
    y = tl.where(small, x + 12.0, x)
    shift = tl.where(small, log(p), 0.0)
    r = 1.0 / y
    r2 = r * r
    # B_2k / (2k (2k-1)) for k = 1..6, Horner in 1/y^2
    series = r * (
        1.0 / 12.0
        + r2 * (-1.0 / 360.0
        + r2 * (1.0 / 1260.0
        + r2 * (-1.0 / 1680.0
        + r2 * (1.0 / 1188.0
        + r2 * (-691.0 / 360360.0)))))
    )
    # the literal is log(2 pi) / 2; kept inline: a Python float bound to a local name becomes a
    # float32 tensor, an inline one takes the dtype of the other operand
    return (y - 0.5) * log(y) - y + 0.91893853320467274178 + series - shift


@triton.jit
def digamma(x):
    """``psi(x) = d/dx log Gamma(x)`` for ``x > 0``, element-wise, in the dtype of ``x``."""
    small = x < 12.0
    # sum_{i<12} 1 / (x + i), only where x < 12
    xs = tl.where(small, x, 1.0)
    acc = 1.0 / xs
    for i in tl.static_range(1, 12):
        acc += 1.0 / (xs + i)
    y = tl.where(small, x + 12.0, x)
    shift = tl.where(small, acc, 0.0)
    r = 1.0 / y
    r2 = r * r
    # B_2k / (2k) for k = 1..7, Horner in 1/y^2
    series = r2 * (
        1.0 / 12.0
        + r2 * (-1.0 / 120.0
        + r2 * (1.0 / 252.0
        + r2 * (-1.0 / 240.0
        + r2 * (1.0 / 132.0
        + r2 * (-691.0 / 32760.0
        + r2 * (1.0 / 12.0)))))))
    return log(y) - 0.5 * r - series - shift


@triton.jit
def _special_kernel(
    x_ptr,  # (N,) arguments, > 0
    lgamma_ptr,  # (N,) out: lgamma(x)
    digamma_ptr,  # (N,) out: digamma(x)
    N,  # number of elements
    BLOCK: tl.constexpr,
):
    """Element-wise lgamma and digamma; used by the tests and the GPU check."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    tl.store(lgamma_ptr + offs, lgamma(x), mask=mask)
    tl.store(digamma_ptr + offs, digamma(x), mask=mask)


def special(x):
    """``(lgamma(x), digamma(x))`` of a float tensor, computed by the Triton code above."""
    x = x.contiguous()
    lg = torch.empty_like(x)
    dg = torch.empty_like(x)
    n = x.numel()
    if n:
        block = 256  # float64 lgamma + digamma: more per thread spills registers
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _special_kernel[(triton.cdiv(n, block),)](x, lg, dg, n, BLOCK=block)
    return lg, dg
