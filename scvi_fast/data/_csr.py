"""Numba kernels that gather CSR rows into preallocated outputs.

Two uses of one kernel:

* staging: the rows of many contiguous row blocks are copied, in the store's own compact dtypes,
  into a preallocated buffer (``gather_rows(..., out dtypes = store dtypes)``);
* emission: the buffer's rows are copied in shuffled order into the minibatch arrays (``int32``
  column indices, ``float32`` exact counts) while the per-cell library size is accumulated.

Both are a serial prefix sum over the selected rows' lengths followed by a parallel copy, one row
per ``prange`` iteration. Everything runs with the GIL released so that a background thread can
prefetch while the training loop runs.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

# The workqueue threading layer aborts when two Python threads launch parallel kernels at once;
# the kernels already use every core, so serialising them costs nothing.
_PARALLEL_LOCK = threading.Lock()


@njit(nogil=True, cache=True)
def _row_offsets_inner(src_indptr, rows, out_indptr):
    """Serial prefix sum: ``out_indptr[i + 1] = out_indptr[i] + len(row rows[i])``."""
    out_indptr[0] = 0
    acc = np.int64(0)
    for i in range(rows.shape[0]):
        r = rows[i]
        acc += np.int64(src_indptr[r + 1]) - np.int64(src_indptr[r])
        out_indptr[i + 1] = acc
    return acc


# Loop indices are unsigned on purpose: numba wraps negative signed indices, and that check
# stops LLVM from vectorising the copy loops (about 4x slower here).


@njit(nogil=True, parallel=True, cache=True)
def _gather_rows_inner(src_indptr, src_indices, src_data, rows, out_indptr, out_indices, out_data):
    """Copy rows ``rows`` of a CSR matrix into ``out_*`` (``out_indptr`` already filled).

    src_indptr  : (n_src + 1,) int32/int64 row pointers of the source
    src_indices : (nnz_src,) column indices of the source, any integer dtype
    src_data    : (nnz_src,) values of the source, any numeric dtype
    rows        : (n_out,) int64 source rows to copy, in output order
    out_indptr  : (n_out + 1,) int64 output row pointers (from ``_row_offsets_inner``)
    out_indices : (out_indptr[-1],) output column indices; values are cast to its dtype
    out_data    : (out_indptr[-1],) output values; values are cast to its dtype
    """
    for i in prange(rows.shape[0]):
        r = np.uint64(rows[i])
        s = np.uint64(src_indptr[r])
        n = np.uint64(src_indptr[r + np.uint64(1)]) - s
        o = np.uint64(out_indptr[i])
        for k in range(n):
            out_indices[o + k] = src_indices[s + k]
        for k in range(n):
            out_data[o + k] = src_data[s + k]


@njit(nogil=True, parallel=True, cache=True, fastmath={"reassoc"})
def _gather_rows_sum_inner(
    src_indptr, src_indices, src_data, rows, out_indptr, out_indices, out_data, out_sum
):
    """As ``_gather_rows_inner``, also writing each output row's sum into ``out_sum``.

    The sum is accumulated in float64 and may be reassociated (so that it vectorises); for
    integer counts every partial sum is an integer below 2**53, hence exact in any order.
    """
    for i in prange(rows.shape[0]):
        r = np.uint64(rows[i])
        s = np.uint64(src_indptr[r])
        n = np.uint64(src_indptr[r + np.uint64(1)]) - s
        o = np.uint64(out_indptr[i])
        for k in range(n):
            out_indices[o + k] = src_indices[s + k]
        acc = 0.0
        for k in range(n):
            v = src_data[s + k]
            out_data[o + k] = v
            acc += np.float64(v)
        out_sum[i] = acc


def row_offsets(src_indptr: np.ndarray, rows: np.ndarray, out_indptr: np.ndarray | None = None):
    """Row pointers of the CSR matrix made of rows ``rows`` of a matrix with ``src_indptr``.

    Returns ``(out_indptr, nnz)``.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if out_indptr is None:
        out_indptr = np.empty(rows.shape[0] + 1, dtype=np.int64)
    nnz = _row_offsets_inner(src_indptr, rows, out_indptr)
    return out_indptr, int(nnz)


def gather_rows(
    src_indptr: np.ndarray,
    src_indices: np.ndarray,
    src_data: np.ndarray,
    rows: np.ndarray,
    indices_dtype=None,
    data_dtype=None,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    out_sum: np.ndarray | None = None,
    offsets_ready: bool = False,
):
    """Gather rows of a CSR matrix (given by its three arrays) into a new CSR matrix.

    Parameters
    ----------
    src_indptr, src_indices, src_data
        The source CSR arrays (numpy arrays or memory maps).
    rows
        Source row ids, in output order; may repeat and may be empty.
    indices_dtype, data_dtype
        Output dtypes (default: the source dtypes). Ignored when ``out`` is given.
    out
        Optional preallocated ``(indptr, indices, data)``; ``indptr`` must have ``len(rows) + 1``
        entries and ``indices``/``data`` at least ``nnz`` entries. Returned views are trimmed.
    out_sum
        Optional ``(len(rows),)`` array receiving each output row's sum.
    offsets_ready
        ``out[0]`` already holds the output row pointers (from :func:`row_offsets`).

    Returns
    -------
    (indptr, indices, data) with ``indptr`` int64.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    n_src = src_indptr.shape[0] - 1
    if rows.size and (rows.min() < 0 or rows.max() >= n_src):
        raise IndexError(f"row ids must lie in [0, {n_src}), got [{rows.min()}, {rows.max()}]")
    if out is None:
        indptr, nnz = row_offsets(src_indptr, rows)
        indices = np.empty(nnz, dtype=indices_dtype or src_indices.dtype)
        data = np.empty(nnz, dtype=data_dtype or src_data.dtype)
    else:
        indptr, indices, data = out
        if offsets_ready:
            nnz = int(indptr[-1])
        else:
            _, nnz = row_offsets(src_indptr, rows, indptr)
        if indices.shape[0] < nnz or data.shape[0] < nnz:
            raise ValueError(f"output buffers hold {min(indices.shape[0], data.shape[0])} < {nnz}")
        indices = indices[:nnz]
        data = data[:nnz]
    with _PARALLEL_LOCK:
        # small dynamic chunks: on a shared machine a statically split loop waits for its
        # slowest (descheduled) thread
        old_chunk = numba.set_parallel_chunksize(64)
        try:
            if out_sum is None:
                _gather_rows_inner(src_indptr, src_indices, src_data, rows, indptr, indices,
                                   data)
            else:
                _gather_rows_sum_inner(src_indptr, src_indices, src_data, rows, indptr,
                                       indices, data, out_sum)
        finally:
            numba.set_parallel_chunksize(old_chunk)
    return indptr, indices, data
