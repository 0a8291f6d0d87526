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

* Forward (:mod:`._nb_fwd`): one program per (cell, chunk of genes) computes the
  log-sum-exp, the dense terms and the non-zero terms from one read of its chunk (rows split
  into several chunks combine partials); it saves ``lse`` and ``C`` (two floats per cell).
* Backward (:mod:`._nb_bwd`): one program per ``(cells x genes)`` tile writes the dense part of
  ``dz`` and per-tile px_r partials, then one program per cell rewrites ``dz`` at its non-zeros
  and adds their px_r terms (atomic adds, or a deterministic ``index_add_``).

CSR contract (see :mod:`scvi_fast.reference._csr`): only entries ``indptr[0] .. indptr[-1]``
are read; ``indices`` / ``values`` may be a longer, padded capacity. Rows must not repeat a
gene (canonical CSR, as the loader and scipy produce): the terms are per entry and not
linear in ``x``. Stored gene ids outside ``[0, G)`` are skipped.

Logits may be float32, float64, bfloat16 or float16; the low-precision ones are read as they
are (no float32 copy), every sum is float32, the log-likelihood comes back in float32 and
the logits' gradient is written in the logits' dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from scvi_fast.kernels.triton import interpreting
from scvi_fast.kernels.triton._common import check_float, check_tensors, on_device
from scvi_fast.kernels.triton._nb_bwd import nb_backward
from scvi_fast.kernels.triton._nb_fwd import nb_forward
from scvi_fast.reference import csr_parts

# whether the kernels of this op are interpreted (fixed when triton.jit decorates them)
_INTERPRETED = interpreting()


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
