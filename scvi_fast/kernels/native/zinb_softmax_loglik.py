"""Fused softmax + zero-inflated negative-binomial log-likelihood of CSR counts, on the CPU.

Per cell b, with ``rho = softmax(logits_b)``, ``mu = exp(l_b) rho``, ``theta = exp(px_r)``,
``pi`` the dropout logits and ``nb0 = theta (log(theta+eps) - log(theta+mu+eps))`` (the NB
log-probability of a zero), scvi-tools' ``log_zinb_positive`` summed over genes is::

    L_b = sum_g Z_g + sum_{x_g>0} (N_g - Z_g)
    Z = softplus(nb0 - pi) - softplus(-pi)                                   (every entry)
    N = -softplus(pi) + nb0 + x (log(mu+eps) - log(theta+mu+eps))
        + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)                      (non-zeros)

The C++ kernel (``csrc/likelihood_impl.h``, with the gradients) makes one row pass for the
log-sum-exp and one dense pass for ``Z`` and its gradients (one log, two exps and two log1ps
per entry), then evaluates ``N - Z`` and the gradients of ``N`` in double at the non-zeros,
where alone lgamma and digamma run. As for the NB op the loss is the end of the graph, so the
forward writes ``d L_b / d logits_b``, ``d L_b / d pi_b`` (and ``d L_b / d px_r_b`` for a
``(B, G)`` dispersion) and backward only scales them by the upstream gradient; a ``(G,)``
dispersion's gradient is summed over cells in the kernel, which is right for a uniform
upstream gradient (a mean or sum of the loss) and is recomputed with the upstream gradient
as row weights otherwise.

The same kernel without dropout logits is the NB likelihood; :func:`nb_softmax_loglik_rows`
is how the native NB op takes a ``(B, G)`` dispersion.
"""

from __future__ import annotations

import torch

from scvi_fast import reference
from scvi_fast._native import load
from scvi_fast.kernels.native._args import kernel_args


class ZINBSoftmaxLoglikFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, log_library, px_r, dropout, indptr, indices, values, eps):
        need_logits, need_lib, need_r, need_pi = ctx.needs_input_grad[:4]
        need_pi = need_pi and dropout is not None
        loglik, d_logits, sum_a, d_r, d_pi = load().zinb_softmax_loglik_forward(
            logits, log_library, px_r, dropout, indptr, indices, values, eps, None,
            need_logits, need_lib, need_r, need_pi,
        )
        ctx.eps = eps
        ctx.lib_shape = log_library.shape
        ctx.has_dropout = dropout is not None
        # a (G,) px_r gradient under a non-uniform upstream gradient reruns the kernel
        rerun = need_r and px_r.dim() == 1
        ctx.save_for_backward(
            d_logits if need_logits else None,
            sum_a if need_lib else None,
            d_r if need_r else None,
            d_pi if need_pi else None,
            *((logits, log_library, px_r, dropout, indptr, indices, values) if rerun else ()),
        )
        return loglik

    @staticmethod
    def backward(ctx, g):
        d_logits, sum_a, d_r, d_pi = ctx.saved_tensors[:4]
        g = g.contiguous()
        gc = g.unsqueeze(1)
        out_logits = d_logits * gc if d_logits is not None else None
        out_lib = (sum_a * g).reshape(ctx.lib_shape) if sum_a is not None else None
        out_pi = d_pi * gc if d_pi is not None else None
        out_r = None
        if d_r is not None and d_r.dim() == 2:
            out_r = d_r * gc
        elif d_r is not None:
            if g.numel() == 0:
                out_r = torch.zeros_like(d_r)
            elif bool((g == g[0]).all()):
                out_r = d_r * g[0]
            else:
                logits, log_library, px_r, dropout, indptr, indices, values = ctx.saved_tensors[4:]
                out_r = load().zinb_softmax_loglik_forward(
                    logits, log_library, px_r, dropout, indptr, indices, values, ctx.eps, g,
                    False, False, True, False,
                )[3]
        return out_logits, out_lib, out_r, out_pi, None, None, None, None


def zinb_softmax_loglik(logits, log_library, px_r, dropout_logits, X_csr, eps=1e-8):
    """Native version of :func:`scvi_fast.reference.zinb_softmax_loglik` (same arguments).

    ``px_r`` is ``(G,)`` or ``(B, G)``, ``dropout_logits`` ``(B, G)``. Counts are cast to the
    dtype of ``logits`` as in the reference; the non-zero terms are evaluated in double.
    Stored indices must be unique within a row (canonical CSR). bfloat16 / float16 inputs are
    evaluated in float32, as by the reference.
    """
    if logits.dtype in reference.LOW_PRECISION:
        logits = logits.float()
    lib, r, *csr, eps = kernel_args(log_library, px_r, X_csr, eps, logits.dtype)
    return ZINBSoftmaxLoglikFunction.apply(
        logits.contiguous(), lib, r, dropout_logits.to(logits.dtype).contiguous(), *csr, eps
    )


def nb_softmax_loglik_rows(logits, log_library, px_r, X_csr, eps=1e-8):
    """:func:`scvi_fast.reference.nb_softmax_loglik` by the ZINB kernel without zero
    inflation: the native NB op's path for a ``(B, G)`` ``px_r`` (any shape works)."""
    if logits.dtype in reference.LOW_PRECISION:
        logits = logits.float()
    lib, r, *csr, eps = kernel_args(log_library, px_r, X_csr, eps, logits.dtype)
    return ZINBSoftmaxLoglikFunction.apply(logits.contiguous(), lib, r, None, *csr, eps)
