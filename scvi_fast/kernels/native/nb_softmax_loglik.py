"""Fused softmax + negative-binomial log-likelihood of CSR counts, on the CPU.

Per cell b, with ``rho = softmax(logits_b)``, ``mu = exp(l_b) rho``,
``theta = exp(px_r)`` and counts ``x`` (scvi-tools' ``log_nb_positive``)::

    L_b = sum_g theta (log(theta+eps) - log(theta+mu+eps))
        + sum_{x_g>0} x (log(mu+eps) - log(theta+mu+eps))
                      + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)

(the lgamma terms cancel at zero counts, so they run over the non-zeros only).
With ``a_g = x mu/(mu+eps) - (theta+x) mu/(theta+mu+eps)`` and ``A = sum_g a_g``:

    dL_b/dlogit_k = a_k - rho_k A,      dL_b/dl_b = A,
    dL_b/dpx_r_g  = theta [log(theta+eps) - log(theta+mu+eps) + theta/(theta+eps)
                           - (theta+x)/(theta+mu+eps) + psi(x+theta) - psi(theta)]

The C++ forward makes one row pass for the log-sum-exp and one dense pass with
one exp, one log and two divisions per entry, writes ``dL_b/dlogits_b``
(the loss is the end of the graph, so the gradient is produced in the forward
and only scaled by the upstream gradient in backward), ``A`` per cell and the
px_r gradient summed over cells. That sum is only right when the upstream
gradient is the same for every cell (a mean or sum of the loss, as in
training); for any other upstream gradient backward re-runs the kernel with the
upstream gradient as row weights. The B x G softmax, mu and per-term tensors
are never materialised.
"""

from __future__ import annotations

import torch

from scvi_fast import reference
from scvi_fast._native import load
from scvi_fast.kernels.native._args import kernel_args
from scvi_fast.kernels.native.zinb_softmax_loglik import nb_softmax_loglik_rows


class NBSoftmaxLoglikFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, log_library, px_r, indptr, indices, values, eps):
        need_logits, need_lib, need_r = ctx.needs_input_grad[:3]
        loglik, grad_logits, sum_a, grad_r, _ = load().nb_softmax_loglik_forward(
            logits, log_library, px_r, indptr, indices, values, eps, None,
            need_logits, need_lib, need_r, None, False,
        )
        ctx.eps = eps
        ctx.lib_shape = log_library.shape
        # logits are kept only for the rare non-uniform upstream gradient of px_r.
        ctx.save_for_backward(
            grad_logits if need_logits else None,
            sum_a if need_lib else None,
            grad_r if need_r else None,
            *((logits, log_library, px_r, indptr, indices, values) if need_r else ()),
        )
        return loglik

    @staticmethod
    def backward(ctx, g):
        need_logits, need_lib, need_r = ctx.needs_input_grad[:3]
        saved = ctx.saved_tensors
        grad_logits, sum_a, grad_r = saved[:3]
        g = g.contiguous()
        d_logits = d_lib = d_r = None
        if need_logits:
            d_logits = grad_logits * g.unsqueeze(1)
        if need_lib:
            d_lib = (sum_a * g).reshape(ctx.lib_shape)
        if need_r:
            if g.numel() == 0:
                d_r = torch.zeros_like(grad_r)
            elif bool((g == g[0]).all()):
                d_r = grad_r * g[0]
            else:
                logits, log_library, px_r, indptr, indices, values = saved[3:]
                d_r = load().nb_softmax_loglik_forward(
                    logits, log_library, px_r, indptr, indices, values, ctx.eps, g,
                    False, False, True, None, False,
                )[3]
        return d_logits, d_lib, d_r, None, None, None, None


def nb_softmax_loglik(logits, log_library, px_r, X_csr, eps=1e-8):
    """Native version of :func:`scvi_fast.reference.nb_softmax_loglik` (same arguments).

    Counts are cast to the dtype of ``logits`` as in the reference (exact for
    integers up to 2^24 in float32); the non-zero terms are evaluated in double.
    Stored indices must be unique within a row (canonical CSR). bfloat16 / float16 logits
    are evaluated in float32, as by the reference. A ``(B, G)`` ``px_r`` (per-cell
    dispersions) runs the ZINB kernel without zero inflation
    (:func:`~scvi_fast.kernels.native.zinb_softmax_loglik.nb_softmax_loglik_rows`).
    """
    if px_r.dim() == 2:
        return nb_softmax_loglik_rows(logits, log_library, px_r, X_csr, eps)
    if logits.dtype in reference.LOW_PRECISION:
        logits = logits.float()
    return NBSoftmaxLoglikFunction.apply(
        logits.contiguous(), *kernel_args(log_library, px_r, X_csr, eps, logits.dtype)
    )
