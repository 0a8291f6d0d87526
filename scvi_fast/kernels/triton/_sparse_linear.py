"""Sparse-input linear layer with a gathered covariate row, in Triton.

Forward, for a CSR minibatch ``X`` (``B x G``), gene-major ``W`` (``G x H``), bias ``b`` and
covariate rows ``W_cov`` (``K x H``)::

    y[r, :] = sum_{k in row r} f(v_k) W[g_k, :] + b + W_cov[cov_r, :]          f = log1p or id

Backward (no gradient to the data)::

    dW[g, :]     = sum_{k in column g} f(v_k) dy[r_k, :]      (the same sum over the CSC of X)
    db           = sum_r dy[r, :]
    dW_cov[c, :] = sum_{r : cov_r = c} dy[r, :]                (a CSC of the one-hot of cov)

Two methods compute it:

* ``"dense"`` (the default on a GPU): ``_densify_kernel`` scatters ``f(v)`` into a zeroed dense
  ``(B, G)`` buffer, one program per cell (repeated genes of a row add up: atomic adds), and
  torch's GEMM does the rest: ``y = X W + b`` and ``dW = X^T dy`` on cuBLAS, in TF32 when
  ``torch.backends.cuda.matmul.allow_tf32`` is set and in the autocast dtype under autocast
  (the buffer is then written in that dtype, so nothing is cast afterwards). At the Census
  shape the GEMM (``2 B G H`` on tensor cores) beats a gather of ``nnz`` weight rows.
* ``"gather"``: all three weighted sums are one kernel, ``_segment_gather_kernel``: output row
  ``s`` is the sum, over the entries ``k`` of segment ``s``, of ``weight_k * src[idx_k, :]``.
  The forward runs it on the CSR (segments = cells, src = W); ``dW`` on the CSC (segments =
  genes, src = dy); ``dW_cov`` (both methods) on the cells sorted by category (segments =
  categories, src = dy, weight 1).

Why a transposed (CSC) pass for ``dW`` and not atomics: scattering from the CSR would issue one
atomic add per non-zero *per hidden unit* (``nnz * H``: 420M at the Census shape, many on the same
rows of highly expressed genes), and its float sums would depend on scheduling order. The CSC
costs one stable sort of the gene ids (a radix sort on the GPU, no ``H`` factor), writes every
``dW`` row exactly once (genes without non-zeros get zeros, no separate fill) and is
deterministic run to run.

CSR contract (see :mod:`scvi_fast.reference._csr`): only entries ``indptr[0] .. indptr[-1]``
are read; ``indices`` / ``values`` may be a longer, padded capacity. Stored gene ids outside
``[0, G)`` are skipped. Nothing synchronises with the host.
"""

from __future__ import annotations

import functools

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
    torch_acc_dtype,
)
from scvi_fast.kernels.triton._configs import choose, unique
from scvi_fast.kernels.triton._csr import entry_genes, row_span
from scvi_fast.kernels.triton._math import log1p
from scvi_fast import reference
from scvi_fast.reference import csr_row_ids, csr_valid, resolve_method

# whether the kernels below are interpreted (fixed when triton.jit decorates them)
_INTERPRETED = interpreting()

_TRANSFORMS = ("log1p", "identity")


@triton.jit
def _segment_gather_kernel(
    out_ptr, out_row_stride,  # (S, H) out: one row per segment
    seg_ptr,  # (S + 1,) int: the entries of segment s are seg[s] .. seg[s+1]-1
    idx_ptr,  # (E,) int: the row of src that each entry reads (entries outside [0, R) skipped)
    val_ptr,  # (E,) entry weights before the transform (read when HAS_VAL)
    src_ptr, src_row_stride,  # (R, H) rows to gather (column stride 1)
    bias_ptr,  # (H,) added to every output row when HAS_BIAS
    cov_ptr,  # (S,) int: category of each output row, when HAS_COV
    cov_w_ptr, cov_w_row_stride,  # (K, H) category rows: out[s] += cov_w[cov[s]] when HAS_COV
    R, H,  # rows of src, number of columns
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
    start, end = row_span(seg_ptr, s)
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for k0 in range(start, end, BLOCK_E):
        ks = k0 + tl.arange(0, BLOCK_E)
        rows, k_mask = entry_genes(idx_ptr, ks, end, 0, R)
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


@triton.jit
def _densify_kernel(
    out_ptr, out_row_stride,  # (B, G) in/out: zeroed dense buffer, f(values) added in place
    indptr_ptr, indices_ptr, values_ptr,  # CSR: (B + 1,), (capacity,), (capacity,)
    G,  # genes (columns of out)
    LOG1P: tl.constexpr,  # f = log1p (else identity)
    ACC: tl.constexpr,  # dtype f is evaluated in (float32, or float64 for a float64 out)
    BLOCK_NZ: tl.constexpr,  # CSR entries per step
):
    """``out[r, g_k] += f(v_k)`` for the entries ``k`` of row ``r`` (one program per row).

    Atomic adds, so that a gene repeated within a row adds up whatever the lanes' order; a
    canonical row never hits an address twice and the adds cost what plain stores would.
    """
    row = tl.program_id(0).to(tl.int64)
    start, end = row_span(indptr_ptr, row)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        g, kmask = entry_genes(indices_ptr, ks, end, 0, G)
        v = tl.load(values_ptr + ks, mask=kmask, other=0.0).to(ACC)
        if LOG1P:
            v = log1p(v)
        tl.atomic_add(out_ptr + row * out_row_stride + g, v.to(out_ptr.dtype.element_ty),
                      mask=kmask, sem="relaxed")


# ----------------------------------------------------------------------------- configurations


@functools.lru_cache(maxsize=None)
def gather_candidates(H: int, dtype: torch.dtype) -> tuple[dict, ...]:
    """Gather tile configurations, the default first: a (BLOCK_E, BLOCK_H) tile of ~2048
    elements (16 loads in flight per thread; wider entry steps when the column block is
    narrow)."""
    block_h = block_size(H, 128)
    if dtype == torch.float64:  # twice the registers per element: 8 warps keep it unspilled
        return (dict(BLOCK_E=max(16, min(64, 2048 // block_h)), BLOCK_H=block_h, num_warps=8),)
    cands = [dict(BLOCK_E=max(16, min(64, 2048 // block_h)), BLOCK_H=block_h, num_warps=4)]
    cands += [dict(BLOCK_E=32, BLOCK_H=block_size(H, 256), num_warps=8),
              dict(BLOCK_E=64, BLOCK_H=block_size(H, 64), num_warps=4),
              dict(BLOCK_E=16, BLOCK_H=block_size(H, 512), num_warps=8)]
    return unique(cands)


@functools.lru_cache(maxsize=None)
def densify_candidates() -> tuple[dict, ...]:
    """Densify configurations, the default first (one program per cell, ~800 entries at the
    Census shape: a few steps of 256)."""
    return (dict(BLOCK_NZ=256, num_warps=4), dict(BLOCK_NZ=128, num_warps=4),
            dict(BLOCK_NZ=512, num_warps=8), dict(BLOCK_NZ=1024, num_warps=8))


# ----------------------------------------------------------------------------- launchers


def segment_gather(
    n_segments, seg, idx, val, src, out_dtype, log1p=False, bias=None, cov=None, cov_w=None
):
    """Host launcher of :func:`_segment_gather_kernel`; returns the ``(n_segments, H)`` output."""
    H = src.shape[1]
    out = torch.empty(n_segments, H, dtype=out_dtype, device=src.device)
    if n_segments == 0 or H == 0:
        return out
    dummy = src

    def launch(cfg):
        _segment_gather_kernel[(n_segments, triton.cdiv(H, cfg["BLOCK_H"]))](
            out, out.stride(0),
            seg, idx,
            val if val is not None else dummy,
            src, src.stride(0),
            bias if bias is not None else dummy,
            cov if cov is not None else seg,
            cov_w if cov_w is not None else dummy,
            cov_w.stride(0) if cov_w is not None else 0,
            src.shape[0], H,
            HAS_VAL=val is not None, LOG1P=log1p,
            HAS_BIAS=bias is not None, HAS_COV=cov is not None, ACC=acc_dtype(out_dtype), **cfg,
        )

    key = (n_segments, src.shape[0], H, out_dtype, val is not None)
    launch(choose("segment_gather", key, gather_candidates(H, out_dtype), launch, src.device))
    return out


def densify(indptr, indices, values, n_cols, dtype, log1p=False):
    """``(B, n_cols)`` dense matrix of ``f(values)`` in ``dtype`` (repeated genes add up; the
    padded tail is ignored). ``f`` is evaluated in float32 (float64 for a float64 output)."""
    B = indptr.numel() - 1
    dev = values.device
    # Triton's interpreter has no 16-bit atomics: there the scatter runs in float32
    work = torch.float32 if _INTERPRETED and dtype in (torch.float16, torch.bfloat16) else dtype
    out = torch.empty(B, n_cols, dtype=work, device=dev)
    if B == 0 or n_cols == 0 or indices.numel() == 0:
        return out.zero_().to(dtype)

    def launch(cfg):
        _densify_kernel[(B,)](
            out, out.stride(0), indptr, indices, values, n_cols,
            LOG1P=log1p, ACC=acc_dtype(dtype), **cfg,
        )

    def bench(cfg):  # a timing repeat must start from zeros again
        out.zero_()
        launch(cfg)

    cfg = choose("densify", (B, n_cols, dtype), densify_candidates(), bench, dev)
    out.zero_()
    launch(cfg)
    return out.to(dtype)


def _segments(keys: torch.Tensor, n_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of integer ``keys`` and the segment pointer of each key value.

    Returns ``(order, seg)``: ``keys[order]`` is sorted, and the entries with key ``j`` are
    ``order[seg[j]:seg[j+1]]``; keys ``>= n_segments`` sort after every segment. ``searchsorted``
    instead of ``bincount`` keeps it free of host-device synchronisation.
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(n_segments + 1, device=keys.device, dtype=sorted_keys.dtype)
    seg = torch.searchsorted(sorted_keys, bounds)
    return order, seg


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_cov_grads(ctx, grad_y, cov, need_b, need_cov):
    """``db`` and ``dW_cov`` (either None when not needed), shared by both methods."""
    db = dW_cov = None
    if need_b:
        db = grad_y.sum(0, dtype=torch_acc_dtype(grad_y.dtype)).to(ctx.dtypes[1])
    if need_cov:
        order, covptr = _segments(cov, ctx.n_cov)
        dW_cov = segment_gather(ctx.n_cov, covptr, order, None, grad_y, ctx.dtypes[2])
    return db, dW_cov


def _save_meta(ctx, W, b, W_cov, log1p):
    ctx.log1p = log1p
    ctx.n_genes = W.shape[0]
    ctx.n_cov = W_cov.shape[0] if W_cov is not None else 0
    ctx.dtypes = (W.dtype, None if b is None else b.dtype, None if W_cov is None else W_cov.dtype)


class SparseLinear(torch.autograd.Function):
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR ``X`` by gathers; gradients to W, b,
    W_cov."""

    @staticmethod
    def forward(ctx, indptr, indices, values, W, b, cov, W_cov, log1p):
        y = segment_gather(
            indptr.numel() - 1, indptr, indices, values, W, W.dtype,
            log1p=log1p, bias=b, cov=cov, cov_w=W_cov,
        )
        ctx.save_for_backward(indptr, indices, values, cov)
        _save_meta(ctx, W, b, W_cov, log1p)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        indptr, indices, values, cov = ctx.saved_tensors
        need_w, need_b, need_cov = (ctx.needs_input_grad[i] for i in (3, 4, 6))
        dW = None
        grad_y = _contiguous_rows(grad_y)
        if need_w:
            # CSC of X: entries sorted by gene, each carrying its row id. Padding and gene ids
            # outside [0, G) get the key G: they sort after the last gene's segment.
            n = indices.numel()
            keep = csr_valid(indptr, n) & (indices >= 0) & (indices < ctx.n_genes)
            keys = torch.where(keep, indices, ctx.n_genes)
            rows = csr_row_ids(indptr, n)
            order, colptr = _segments(keys, ctx.n_genes)
            dW = segment_gather(
                ctx.n_genes, colptr, rows[order], values[order], grad_y, ctx.dtypes[0],
                log1p=ctx.log1p,
            )
        db, dW_cov = _bias_cov_grads(ctx, grad_y, cov, need_b, need_cov)
        return None, None, None, dW, db, None, dW_cov, None


class DenseLinear(torch.autograd.Function):
    """The same layer by densifying ``f(X)`` on the device and a GEMM (cuBLAS on CUDA)."""

    @staticmethod
    def forward(ctx, indptr, indices, values, W, b, cov, W_cov, log1p, gemm_dtype):
        X = densify(indptr, indices, values, W.shape[0], gemm_dtype, log1p=log1p)
        # under autocast torch casts W and b to the autocast dtype (X already is)
        y = torch.mm(X, W) if b is None else torch.addmm(b, X, W)
        if W_cov is not None:
            y.add_(W_cov.index_select(0, cov).to(y.dtype))
        ctx.save_for_backward(X, cov)
        _save_meta(ctx, W, b, W_cov, log1p)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        X, cov = ctx.saved_tensors
        need_w, need_b, need_cov = (ctx.needs_input_grad[i] for i in (3, 4, 6))
        grad_y = _contiguous_rows(grad_y)
        dW = torch.mm(X.t(), grad_y.to(X.dtype)).to(ctx.dtypes[0]) if need_w else None
        db, dW_cov = _bias_cov_grads(ctx, grad_y, cov, need_b, need_cov)
        return None, None, None, dW, db, None, dW_cov, None, None


def _gemm_dtype(W: torch.Tensor) -> torch.dtype:
    """The dtype torch's GEMM will run in for ``W``: the autocast dtype under autocast (which
    casts float32 operands only)."""
    kind = W.device.type
    if torch.is_autocast_enabled(kind) and W.dtype == torch.float32:
        return torch.get_autocast_dtype(kind)
    return W.dtype


def sparse_linear(
    indptr, indices, values, W, b, cov=None, W_cov=None, transform="log1p", method="auto"
):
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR minibatch ``X`` of shape ``(B, G)``.

    Same semantics as :func:`scvi_fast.reference.sparse_linear` (``W`` is ``(G, H)``,
    ``W_cov`` is ``(K, H)``, ``method`` is ``"auto"``, ``"gather"`` or ``"dense"``). Rows of
    the CSR may hold duplicate gene ids (they add up, as in the reference); a padded tail past
    ``indptr[-1]`` is ignored. Gradients flow to ``W``, ``b`` and ``W_cov``.
    """
    if transform not in _TRANSFORMS:
        raise ValueError(f"transform must be one of {_TRANSFORMS}; got {transform!r}")
    reference.check_cov(cov, W_cov, indptr.numel() - 1)
    cov, extra = reference.split_cov(cov)
    method = resolve_method(method, W.device)
    check_tensors(
        "sparse_linear", _INTERPRETED, indptr=indptr, indices=indices, values=values, W=W, b=b,
        cov=cov if W_cov is not None else None, W_cov=W_cov if cov is not None else None,
    )
    check_float("sparse_linear", W=W)
    if W.dim() != 2:
        raise ValueError(f"sparse_linear: W must be (G, H); got shape {tuple(W.shape)}")
    if indices.numel() != values.numel():
        raise ValueError(
            f"sparse_linear: indices ({indices.numel()}) and values ({values.numel()}) differ "
            "in length"
        )
    if cov is None:
        W_cov = None  # W_cov without cov adds nothing, as in the reference
    else:
        cov = cov.reshape(-1)
        if cov.numel() != indptr.numel() - 1:
            raise ValueError(
                f"sparse_linear: cov has {cov.numel()} entries for {indptr.numel() - 1} rows"
            )
        cov = cov if cov.is_contiguous() else cov.contiguous()
    W_cov = None if W_cov is None else _contiguous_rows(W_cov)
    b = b if b is None or b.is_contiguous() else b.contiguous()
    args = (indptr.contiguous(), indices.contiguous(), values.contiguous())
    with on_device(W):
        if method == "dense":
            y = DenseLinear.apply(
                *args, W, b, cov, W_cov, transform == "log1p", _gemm_dtype(W)
            )
        else:
            y = SparseLinear.apply(
                *args, _contiguous_rows(W), b, cov, W_cov, transform == "log1p"
            )
        # further categorical covariates: one row gather each, into the same stacked table
        return y if extra is None else y + reference.covariate_rows(extra, W_cov).to(y.dtype)
