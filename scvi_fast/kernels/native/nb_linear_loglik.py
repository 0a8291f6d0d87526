"""The decoder's output layer fused with the NB log-likelihood, on the CPU.

``loglik = nb_softmax_loglik(h @ weight.T + bias, log_library, px_r, X)`` as one autograd
op, so that the ``B x G`` tensors of the step (the logits and their gradient) are never
handed to autograd:

* forward: the logits are computed (float32: by oneDNN, see :mod:`scvi_fast.kernels._gemm`;
  float64: ``addmm`` into a pooled buffer); the C++
  likelihood kernel writes ``d loglik_b / d logits_b`` into a second pooled buffer and also
  returns its column sum; the logits are freed (or go back to the pool) straight away.
* backward, upstream gradient ``g`` (B,): the logit gradient is ``diag(g) D`` with ``D``
  the buffer, and it is never formed. ``dh = diag(g) (D W)``, ``dW = D^T (diag(g) h)`` and
  ``db = D^T g`` (the stored column sum times ``g_0`` when ``g`` is uniform, as for a mean
  loss): the scaling moves onto ``B x H`` tensors. The buffer then goes back to the pool.

Against ``nb_softmax_loglik(F.linear(h, W, b), ...)`` this saves one ``B x G``
multiplication, one reduction over ``B x G`` and the page faults of two fresh 33 MB tensors
per step at the Census shape. A second backward through the same graph (``retain_graph``)
recomputes the buffer from the saved inputs.
"""

from __future__ import annotations

import torch

from scvi_fast import reference
from scvi_fast._native import load
from scvi_fast.kernels import _gemm
from scvi_fast.kernels._scratch import POOL
from scvi_fast.kernels.native._args import kernel_args
from scvi_fast.kernels.native.nb_softmax_loglik import nb_softmax_loglik


def _logits(h, weight, bias) -> tuple[torch.Tensor, bool]:
    """``h @ weight.T + bias`` and whether the tensor is pooled scratch."""
    if _gemm.onednn_available() and h.dtype == torch.float32:
        return _gemm.linear(h, weight, bias), False
    out = POOL.take((h.shape[0], weight.shape[0]), h.dtype, h.device)
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out), True
    return torch.mm(h, weight.t(), out=out), True


def _run(h, weight, bias, log_library, px_r, indptr, indices, values, eps, row_weight,
         need_logits, need_lib, need_r, need_colsum):
    """(loglik, grad buffer or None, sum_a, grad_px_r, colsum) with pooled scratch."""
    shape = (h.shape[0], weight.shape[0])
    logits, pooled = _logits(h, weight, bias)
    gbuf = POOL.take(shape, h.dtype, h.device) if need_logits else None
    try:
        loglik, _, sum_a, grad_r, colsum = load().nb_softmax_loglik_forward(
            logits, log_library, px_r, indptr, indices, values, eps, row_weight,
            need_logits, need_lib, need_r, gbuf, need_colsum and need_logits,
        )
    except BaseException:
        POOL.give(gbuf)
        raise
    finally:
        if pooled:
            POOL.give(logits)
        del logits
    return loglik, gbuf, sum_a, grad_r, colsum


class NBLinearLoglikFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, log_library, px_r, indptr, indices, values, eps):
        need_h, need_w, need_b, need_lib, need_r = ctx.needs_input_grad[:5]
        need_logits = need_h or need_w or need_b
        loglik, gbuf, sum_a, grad_r, colsum = _run(
            h, weight, bias, log_library, px_r, indptr, indices, values, eps, None,
            need_logits, need_lib, need_r, need_b,
        )
        ctx.eps = eps
        ctx.gbuf = gbuf  # owned by this node until backward gives it back to the pool
        ctx.save_for_backward(h, weight, bias, log_library, px_r, indptr, indices, values,
                              sum_a if need_lib else None, grad_r if need_r else None,
                              colsum if need_b else None)
        return loglik

    @staticmethod
    def backward(ctx, g):
        need_h, need_w, need_b, need_lib, need_r = ctx.needs_input_grad[:5]
        (h, weight, bias, log_library, px_r, indptr, indices, values,
         sum_a, grad_r, colsum) = ctx.saved_tensors
        g = g.contiguous()
        uniform = g.numel() > 0 and bool((g == g[0]).all())
        dh = dW = db = d_lib = d_r = None
        if need_lib:
            d_lib = (sum_a * g).reshape(log_library.shape)
        if need_r:
            if g.numel() == 0:
                d_r = torch.zeros_like(px_r)
            elif uniform:
                d_r = grad_r * g[0]
            else:  # per-cell weights inside the per-gene sum: run the kernel with them
                d_r = _run(h, weight, bias, log_library, px_r, indptr, indices, values,
                           ctx.eps, g, False, False, True, False)[3]
        if need_h or need_w or need_b:
            gbuf, ctx.gbuf = ctx.gbuf, None
            if gbuf is None:  # second backward through a retained graph
                _, gbuf, _, _, colsum = _run(
                    h, weight, bias, log_library, px_r, indptr, indices, values, ctx.eps,
                    None, True, False, False, need_b,
                )
            gs = g[0] if uniform else g.unsqueeze(1)
            if need_h:
                dh = _gemm.mm(gbuf, weight).mul_(gs)
            if need_w:
                dW = _gemm.mm_t(gbuf, h * gs)
            if need_b:
                db = colsum * g[0] if uniform else torch.mv(gbuf.t(), g)
            POOL.give(gbuf)
        return dh, dW, db, d_lib, d_r, None, None, None, None


def nb_softmax_loglik_linear(h, weight, bias, log_library, px_r, X_csr, eps=1e-8):
    """Native version of :func:`scvi_fast.reference.nb_softmax_loglik_linear` (same arguments).

    The fused kernel takes ``h``, ``weight`` and ``bias`` of one dtype, float32 or float64.
    Under autocast (whose layer runs in bfloat16) and for any other dtypes, this is the
    composition :func:`scvi_fast.reference.linear_then_nb` with the native
    :func:`~scvi_fast.kernels.native.nb_softmax_loglik`: torch's ``F.linear`` applies its
    dtype rules, and the likelihood reads the logits in float32. So is a ``(B, G)`` ``px_r``
    (per-cell dispersions), whose likelihood the native NB op evaluates with the ZINB kernel.
    """
    dtype = h.dtype
    if (
        px_r.dim() == 2
        or torch.is_autocast_enabled(h.device.type)
        or dtype not in (torch.float32, torch.float64)
        or weight.dtype != dtype
        or (bias is not None and bias.dtype != dtype)
    ):
        return reference.linear_then_nb(nb_softmax_loglik, h, weight, bias, log_library, px_r,
                                        X_csr, eps)
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"nb_softmax_loglik_linear: h must be (B, H) and weight (G, H); got {tuple(h.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()  # row- or column-major (the decoder's) are read in place
    return NBLinearLoglikFunction.apply(
        h.contiguous(),
        weight,
        bias.contiguous() if bias is not None else None,
        *kernel_args(log_library, px_r, X_csr, eps, dtype),
    )
