"""Sparse-input linear layer with a gathered covariate row, in Triton.

Forward, for a CSR minibatch ``X`` (``B x G``), gene-major ``W`` (``G x H``), bias ``b`` and
covariate rows ``W_cov`` (``K x H``)::

    y[r, :] = sum_{k in row r} f(v_k) W[g_k, :] + b + W_cov[cov_r, :]          f = log1p or id

Backward (no gradient to the data)::

    dW[g, :]     = sum_{k in column g} f(v_k) dy[r_k, :]      (the same sum over the CSC of X)
    db           = sum_r dy[r, :]
    dW_cov[c, :] = sum_{r : cov_r = c} dy[r, :]                (a CSC of the one-hot of cov)

All three weighted sums are one kernel, ``_segment_gather_kernel``: output row ``s`` is the sum,
over the entries ``k`` of segment ``s``, of ``weight_k * src[idx_k, :]``. The forward runs it on
the CSR (segments = cells, src = W); ``dW`` on the CSC (segments = genes, src = dy); ``dW_cov``
on the cells sorted by category (segments = categories, src = dy, weight 1).

Why a transposed (CSC) pass for ``dW`` and not atomics: scattering from the CSR would issue one
atomic add per non-zero *per hidden unit* (``nnz * H``: 420M at the Census shape, many on the same
rows of highly expressed genes), and its float sums would depend on scheduling order. The CSC
costs one stable sort of the ``nnz`` gene ids (a radix sort on the GPU, no ``H`` factor),
writes every ``dW`` row exactly once (genes without non-zeros get zeros, no separate fill) and
is deterministic run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from scvi_fast.kernels.triton import interpreting
from scvi_fast.kernels.triton._common import (
    acc_dtype,
    block_size,
    check_float,
    check_tensors,
    on_device,
)
from scvi_fast.kernels.triton._math import log1p
from scvi_fast.reference import csr_row_ids

# whether the kernels below are interpreted (fixed when triton.jit decorates them)
_INTERPRETED = interpreting()

_TRANSFORMS = ("log1p", "identity")


@triton.jit
def _segment_gather_kernel(
    out_ptr, out_row_stride,  # (S, H) out: one row per segment
    seg_ptr,  # (S + 1,) int: the entries of segment s are seg[s] .. seg[s+1]-1
    idx_ptr,  # (E,) int: the row of src that each entry reads
    val_ptr,  # (E,) entry weights before the transform (read when HAS_VAL)
    src_ptr, src_row_stride,  # (R, H) rows to gather (column stride 1)
    bias_ptr,  # (H,) added to every output row when HAS_BIAS
    cov_ptr,  # (S,) int: category of each output row, when HAS_COV
    cov_w_ptr, cov_w_row_stride,  # (K, H) category rows: out[s] += cov_w[cov[s]] when HAS_COV
    H,  # number of columns
    HAS_VAL: tl.constexpr,  # weight entries by f(val) (else by 1)
    LOG1P: tl.constexpr,  # f = log1p (else identity)
    HAS_BIAS: tl.constexpr,
    HAS_COV: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_E: tl.constexpr,  # entries per step of the loop over a segment
    BLOCK_H: tl.constexpr,  # columns per program
):
    """``out[s, h] = sum_{k in seg s} f(val[k]) * src[idx[k], h] (+ bias[h] + cov_w[cov[s], h])``.

    Grid: (S, cdiv(H, BLOCK_H)). Each step gathers a (BLOCK_E, BLOCK_H) tile of src rows and
    reduces it over the entries, so the loop runs nnz(s) / BLOCK_E times.
    """
    s = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    start = tl.load(seg_ptr + s).to(tl.int64)
    end = tl.load(seg_ptr + s + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for k0 in range(start, end, BLOCK_E):
        ks = k0 + tl.arange(0, BLOCK_E)
        k_mask = ks < end
        rows = tl.load(idx_ptr + ks, mask=k_mask, other=0).to(tl.int64)
        tile = tl.load(
            src_ptr + rows[:, None] * src_row_stride + cols[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(ACC)
        if HAS_VAL:
            w = tl.load(val_ptr + ks, mask=k_mask, other=0.0).to(ACC)
            if LOG1P:
                w = log1p(w)
            tile = tile * w[:, None]
        acc += tl.sum(tile, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if HAS_COV:
        c = tl.load(cov_ptr + s).to(tl.int64)
        acc += tl.load(cov_w_ptr + c * cov_w_row_stride + cols, mask=col_mask, other=0.0).to(ACC)
    tl.store(out_ptr + s * out_row_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def launch_config(H: int) -> dict:
    """Tile sizes and warps: a (BLOCK_E, BLOCK_H) gather tile of ~2048 elements (16 loads in
    flight per thread; wider entry steps when the column block is narrow)."""
    block_h = block_size(H, 128)
    return dict(BLOCK_E=max(16, min(64, 2048 // block_h)), BLOCK_H=block_h, num_warps=4)


def segment_gather(
    n_segments, seg, idx, val, src, out_dtype, log1p=False, bias=None, cov=None, cov_w=None
):
    """Host launcher of :func:`_segment_gather_kernel`; returns the ``(n_segments, H)`` output."""
    H = src.shape[1]
    out = torch.empty(n_segments, H, dtype=out_dtype, device=src.device)
    if n_segments == 0 or H == 0:
        return out
    cfg = launch_config(H)
    dummy = src
    _segment_gather_kernel[(n_segments, triton.cdiv(H, cfg["BLOCK_H"]))](
        out, out.stride(0),
        seg, idx,
        val if val is not None else dummy,
        src, src.stride(0),
        bias if bias is not None else dummy,
        cov if cov is not None else seg,
        cov_w if cov_w is not None else dummy,
        cov_w.stride(0) if cov_w is not None else 0,
        H,
        HAS_VAL=val is not None, LOG1P=log1p,
        HAS_BIAS=bias is not None, HAS_COV=cov is not None, ACC=acc_dtype(out_dtype), **cfg,
    )
    return out


def _segments(keys: torch.Tensor, n_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of integer ``keys`` and the segment pointer of each key value.

    Returns ``(order, seg)``: ``keys[order]`` is sorted, and the entries with key ``j`` are
    ``order[seg[j]:seg[j+1]]``. ``searchsorted`` instead of ``bincount`` keeps it free of
    host-device synchronisation.
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(n_segments + 1, device=keys.device, dtype=sorted_keys.dtype)
    seg = torch.searchsorted(sorted_keys, bounds)
    return order, seg


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class SparseLinear(torch.autograd.Function):
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR ``X``; gradients to W, b, W_cov."""

    @staticmethod
    def forward(ctx, indptr, indices, values, W, b, cov, W_cov, log1p):
        y = segment_gather(
            indptr.numel() - 1, indptr, indices, values, W, W.dtype,
            log1p=log1p, bias=b, cov=cov, cov_w=W_cov,
        )
        ctx.save_for_backward(indptr, indices, values, cov)
        ctx.log1p = log1p
        ctx.n_genes = W.shape[0]
        ctx.n_cov = W_cov.shape[0] if W_cov is not None else 0
        ctx.dtypes = (
            W.dtype, None if b is None else b.dtype, None if W_cov is None else W_cov.dtype
        )
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        indptr, indices, values, cov = ctx.saved_tensors
        need_w, need_b, need_cov = (ctx.needs_input_grad[i] for i in (3, 4, 6))
        dW = db = dW_cov = None
        grad_y = _contiguous_rows(grad_y)
        if need_w:
            # CSC of X: entries sorted by gene, each carrying its row id
            rows = csr_row_ids(indptr, indices.numel())
            order, colptr = _segments(indices, ctx.n_genes)
            dW = segment_gather(
                ctx.n_genes, colptr, rows[order], values[order], grad_y, ctx.dtypes[0],
                log1p=ctx.log1p,
            )
        if need_b:
            db = grad_y.sum(0).to(ctx.dtypes[1])
        if need_cov:
            order, covptr = _segments(cov, ctx.n_cov)
            dW_cov = segment_gather(ctx.n_cov, covptr, order, None, grad_y, ctx.dtypes[2])
        return None, None, None, dW, db, None, dW_cov, None


def sparse_linear(indptr, indices, values, W, b, cov=None, W_cov=None, transform="log1p"):
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR minibatch ``X`` of shape ``(B, G)``.

    Same semantics as :func:`scvi_fast.reference.sparse_linear` (``W`` is ``(G, H)``,
    ``W_cov`` is ``(K, H)``). Rows of the CSR may hold duplicate gene ids (they add up, as in
    the reference). Gradients flow to ``W``, ``b`` and ``W_cov``.
    """
    if transform not in _TRANSFORMS:
        raise ValueError(f"transform must be one of {_TRANSFORMS}; got {transform!r}")
    if cov is not None and W_cov is None:
        raise ValueError("cov was given without W_cov")
    check_tensors(
        "sparse_linear", _INTERPRETED, indptr=indptr, indices=indices, values=values, W=W, b=b,
        cov=cov if W_cov is not None else None, W_cov=W_cov if cov is not None else None,
    )
    check_float("sparse_linear", W=W)
    if W.dim() != 2:
        raise ValueError(f"sparse_linear: W must be (G, H); got shape {tuple(W.shape)}")
    if cov is None:
        W_cov = None  # W_cov without cov adds nothing, as in the reference
    else:
        cov = cov.reshape(-1)
        if cov.numel() != indptr.numel() - 1:
            raise ValueError(
                f"sparse_linear: cov has {cov.numel()} entries for {indptr.numel() - 1} rows"
            )
    W = _contiguous_rows(W)
    W_cov = None if W_cov is None else _contiguous_rows(W_cov)
    b = None if b is None else b.contiguous()
    with on_device(W):
        return SparseLinear.apply(
            indptr.contiguous(), indices.contiguous(), values.contiguous(),
            W, b, cov if cov is None else cov.contiguous(), W_cov, transform == "log1p",
        )
