"""``y = f(X_csr) @ W + b (+ W_cov[cov])`` on the CPU, W gene-major ``(G, H)``.

Forward (C++): each stored value adds ``f(v) * W[gene, :]``, a contiguous
H-vector, to its row, with ``f`` applied on the fly: 2·nnz·H instead of
2·B·G·H for the dense layer. W is swept in tiles of genes that fit in L2; each
row sums its entries of a tile into a register chunk of its output, so an output
row is read and written once per tile rather than once per stored value. Rows
whose indices are not sorted take a second kernel that transposes a block's
entries by gene and reads W once per block, in order.

Backward (no gradient to the data): ``dW = f(X)^T dy`` (C++: the entries are
transposed by gene with a parallel counting sort, then each thread sums a range of
genes with the dW chunk in registers, so every dW row is written once, without
races; rows and genes are split between threads by their numbers of entries),
``db = dy.sum(0)`` and ``dW_cov = index_add(dy by cov)``; only those that
``ctx.needs_input_grad`` asks for.
"""

from __future__ import annotations

import torch

from scvi_fast import reference
from scvi_fast._native import load

_TRANSFORM_CODES = {"identity": 0, "log1p": 1}


class SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W, b, W_cov, indptr, indices, values, cov, transform_code):
        ext = load()
        y = ext.sparse_linear_forward(indptr, indices, values, W, b, cov, W_cov, transform_code)
        ctx.save_for_backward(indptr, indices, values, cov)
        ctx.n_genes = W.shape[0]
        ctx.n_cov = W_cov.shape[0] if W_cov is not None else 0
        ctx.transform_code = transform_code
        return y

    @staticmethod
    def backward(ctx, dy):
        indptr, indices, values, cov = ctx.saved_tensors
        need_W, need_b, need_W_cov = ctx.needs_input_grad[:3]
        dW = db = dW_cov = None
        if need_W:
            dW = load().sparse_linear_backward_weight(
                indptr, indices, values, dy.contiguous(), ctx.n_genes, ctx.transform_code
            )
        if need_b:
            db = dy.sum(0)
        if need_W_cov:
            dW_cov = dy.new_zeros(ctx.n_cov, dy.shape[1]).index_add_(0, cov, dy)
        return dW, db, dW_cov, None, None, None, None, None


def sparse_linear(
    indptr, indices, values, W, b, cov=None, W_cov=None, transform="log1p", method="auto"
):
    """Native version of :func:`scvi_fast.reference.sparse_linear` (same arguments).

    ``method="dense"`` is the reference's densify + GEMM (the CPU kernels are the gather;
    ``"auto"`` picks it on the CPU).
    """
    if transform not in _TRANSFORM_CODES:
        raise ValueError(f"transform must be one of {tuple(_TRANSFORM_CODES)}; got {transform!r}")
    reference.check_cov(cov, W_cov, indptr.numel() - 1)
    if reference.resolve_method(method, W.device) == "dense":
        return reference.sparse_linear(indptr, indices, values, W, b, cov, W_cov, transform,
                                       method="dense")
    cov, extra = reference.split_cov(cov)
    if cov is None:
        W_cov = None
    else:
        cov = cov.reshape(-1).to(torch.int64).contiguous()
    if indices.dtype not in (torch.int32, torch.int64):
        indices = indices.to(torch.int64)
    y = SparseLinearFunction.apply(
        W.contiguous(),
        b.contiguous() if b is not None else None,
        W_cov.contiguous() if W_cov is not None else None,
        indptr.to(torch.int64).contiguous(),
        indices.contiguous(),
        values.to(W.dtype).contiguous(),
        cov,
        _TRANSFORM_CODES[transform],
    )
    # further categorical covariates: one row gather each, into the same stacked table
    return y if extra is None else y + reference.covariate_rows(extra, W_cov).to(y.dtype)
