"""Fused softmax + zero-inflated NB log-likelihood over CSR counts, in Triton.

Per cell (index dropped), logits ``z_g``, library ``l``, ``theta_g = exp(px_r_g)`` (``px_r``
``(G,)`` or ``(B, G)``), dropout logits ``pi_g``, ``rho = softmax(z)``, ``mu = exp(l) rho``,
``D = theta + mu + eps`` and ``nb0 = theta (log(theta+eps) - log D)``, scvi-tools'
``log_zinb_positive`` summed over genes is::

    ll = sum_g Z_g + sum_{x_g>0} (N_g - Z_g)
    Z  = softplus(nb0 - pi) - softplus(-pi)                            (every entry, dense)
    N  = -softplus(-pi) - pi + nb0 + x (log(mu+eps) - log D)
         + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)               (the non-zeros)

with torch's softplus (``y`` itself above 20). With ``s_z = softplus'(nb0 - pi)``,
``s_u = softplus'(-pi)`` and ``a = mu dll/dmu`` (``a0 = -s_z theta mu / D`` at a zero,
``a1 = x mu/(mu+eps) - (theta+x) mu/D`` at a non-zero), ``A = sum_g a_g``::

    dll/dz_k = a_k - rho_k A          dll/dl = A
    dll/dpi  = s_u - s_z (zero),  s_u - 1 (non-zero)
    dll/dpx_r = s_z theta [log(theta+eps) + theta/(theta+eps) - log D - theta/D]      (zero)
              = theta [log(theta+eps) + theta/(theta+eps) - log D - (theta+x)/D
                       + digamma(x+theta) - digamma(theta)]                        (non-zero)

Without dropout logits the same kernels are the NB likelihood (``Z = nb0``, ``s_z = 1``):
the Triton NB op's path for a ``(B, G)`` dispersion.

* Forward (:mod:`._zinb_fwd`): one program per cell; saves ``lse`` and ``A``.
* Backward (:mod:`._zinb_bwd`): dense tiles, then one program per cell for the non-zeros.

CSR contract as the NB op's (:mod:`._nb_loglik`): entries read only through ``indptr``,
canonical rows, stored gene ids outside ``[0, G)`` skipped. bfloat16 / float16 logits are
read as they are (float32 sums and result, the logits' gradient in their dtype).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from scvi_fast.kernels.triton import interpreting
from scvi_fast.kernels.triton._common import check_float, check_tensors, on_device
from scvi_fast.kernels.triton._zinb_bwd import zinb_backward
from scvi_fast.kernels.triton._zinb_fwd import zinb_forward
from scvi_fast.reference import csr_parts

# whether the kernels of this op are interpreted (fixed when triton.jit decorates them)
_INTERPRETED = interpreting()


class ZINBSoftmaxLoglik(torch.autograd.Function):
    """Per-cell ZINB (or NB, without dropout logits) log-likelihood of CSR counts."""

    @staticmethod
    def forward(ctx, logits, log_library, px_r, pi, indptr, indices, values, eps):
        ll, lse, csum = zinb_forward(logits, log_library, px_r, pi, indptr, indices, values, eps)
        ctx.save_for_backward(logits, log_library, px_r, pi, indptr, indices, values, lse, csum)
        ctx.eps = eps
        return ll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ll):
        logits, log_library, px_r, pi, indptr, indices, values, lse, csum = ctx.saved_tensors
        need_dz, need_dl, need_dr, need_dpi = (bool(n) for n in ctx.needs_input_grad[:4])
        dz, dl, dr, dpi = zinb_backward(
            logits, log_library, px_r, pi, indptr, indices, values, lse, csum,
            grad_ll.contiguous(), ctx.eps, need_dz, need_dl, need_dr, need_dpi,
        )
        return dz, dl, dr, dpi, None, None, None, None


def _apply(op, logits, log_library, px_r, pi, X_csr, eps):
    indptr, indices, values = csr_parts(X_csr)
    check_tensors(op, _INTERPRETED, logits=logits, log_library=log_library, px_r=px_r,
                  dropout_logits=pi, indptr=indptr, indices=indices, values=values)
    check_float(op, logits=logits, log_library=log_library, px_r=px_r)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (B, G); got {tuple(logits.shape)}")
    B, G = logits.shape
    if log_library.numel() != B:
        raise ValueError(f"{op}: log_library has {log_library.numel()} entries for {B} cells")
    if tuple(px_r.shape) not in ((G,), (B, G)):
        raise ValueError(f"{op}: px_r must be ({G},) or ({B}, {G}); got {tuple(px_r.shape)}")
    if pi is not None:
        check_float(op, dropout_logits=pi)
        if tuple(pi.shape) != (B, G):
            raise ValueError(f"{op}: dropout_logits must be ({B}, {G}); got {tuple(pi.shape)}")
        pi = pi.contiguous()
    if indptr.numel() != B + 1:
        raise ValueError(f"{op}: indptr has {indptr.numel()} entries for {B} cells")
    if indices.numel() != values.numel():
        raise ValueError(f"{op}: indices ({indices.numel()}) and values ({values.numel()}) "
                         "differ in length")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    with on_device(logits):
        return ZINBSoftmaxLoglik.apply(
            logits, log_library.reshape(B).contiguous(), px_r.contiguous(), pi,
            indptr.contiguous(), indices.contiguous(), values.contiguous(), float(eps),
        )


def zinb_softmax_loglik(logits, log_library, px_r, dropout_logits, X_csr, eps=1e-8):
    """Per-cell ZINB log-likelihood of CSR counts under ``mu = exp(l) softmax(logits)``.

    Same semantics as :func:`scvi_fast.reference.zinb_softmax_loglik` (``px_r`` ``(G,)`` or
    ``(B, G)``, ``dropout_logits`` ``(B, G)``) for canonical CSR counts. Gradients flow to
    ``logits``, ``log_library``, ``px_r`` and ``dropout_logits``. bfloat16 / float16 logits
    are read as they are; the result is float32 (float64 for float64 logits).
    """
    return _apply("zinb_softmax_loglik", logits, log_library, px_r, dropout_logits, X_csr, eps)


def nb_softmax_loglik_rows(logits, log_library, px_r, X_csr, eps=1e-8):
    """The NB log-likelihood by the ZINB kernels without zero inflation: the Triton NB op's
    path for a ``(B, G)`` ``px_r`` (see :func:`scvi_fast.reference.nb_softmax_loglik`)."""
    return _apply("nb_softmax_loglik", logits, log_library, px_r, None, X_csr, eps)
