"""Fused softmax + Poisson log-likelihood of CSR counts, on the CPU.

With ``rate = exp(l_b) softmax(logits_b)``, ``log(rate_g) = l_b + z_g - lse_b`` and
``sum_g rate_g = exp(l_b)``, so torch's ``Poisson.log_prob`` summed over genes is::

    L_b = sum_{x_g>0} [x_g (l_b + z_g - lse_b) - lgamma(x_g + 1)] - exp(l_b)
    dL_b/dz_k = x_k - rho_k X_b,     dL_b/dl_b = X_b - exp(l_b),     X_b = sum_g x_g

The forward reads the logits once (the row's log-sum-exp) and the non-zeros; it saves
``lse`` and ``X`` (two numbers per cell), and the backward writes the upstream-weighted
logit gradient in one more pass (one exp per entry). Nothing else of size ``B x G`` exists.
"""

from __future__ import annotations

import torch

from scvi_fast import reference
from scvi_fast._native import load
from scvi_fast.kernels.native._args import csr_args


class PoissonSoftmaxLoglikFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, log_library, indptr, indices, values):
        loglik, lse, sum_x = load().poisson_softmax_loglik_forward(
            logits, log_library, indptr, indices, values
        )
        ctx.lib_shape = log_library.shape
        ctx.save_for_backward(logits, log_library, indptr, indices, values, lse, sum_x)
        return loglik

    @staticmethod
    def backward(ctx, g):
        need_logits, need_lib = ctx.needs_input_grad[:2]
        logits, log_library, indptr, indices, values, lse, sum_x = ctx.saved_tensors
        g = g.contiguous()
        d_logits = d_lib = None
        if need_logits:
            d_logits = load().poisson_softmax_loglik_backward(
                logits, lse, sum_x, g, indptr, indices, values
            )
        if need_lib:
            d_lib = (g * (sum_x - torch.exp(log_library))).reshape(ctx.lib_shape)
        return d_logits, d_lib, None, None, None


def poisson_softmax_loglik(logits, log_library, X_csr):
    """Native version of :func:`scvi_fast.reference.poisson_softmax_loglik` (same arguments).

    Counts are cast to the dtype of ``logits`` as in the reference; ``lgamma(x + 1)`` and the
    per-cell sums are evaluated in double. bfloat16 / float16 logits are evaluated in
    float32, as by the reference.
    """
    if logits.dtype in reference.LOW_PRECISION:
        logits = logits.float()
    lib = log_library.to(logits.dtype).reshape(-1).contiguous()
    return PoissonSoftmaxLoglikFunction.apply(logits.contiguous(), lib, *csr_args(X_csr, logits.dtype))
