"""Reading a CSR minibatch inside a kernel, under the package's CSR contract.

Only the entries ``indptr[r] .. indptr[r+1] - 1`` of row ``r`` are read (``indices`` and
``values`` may be a longer, padded capacity), and stored gene ids outside the range a kernel
asks for are masked off rather than read out of bounds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_span(indptr_ptr, row):
    """``(start, end)`` (int64) of the stored entries of ``row``."""
    start = tl.load(indptr_ptr + row).to(tl.int64)
    end = tl.load(indptr_ptr + row + 1).to(tl.int64)
    return start, end


@triton.jit
def entry_genes(indices_ptr, ks, end, lo, hi):
    """Gene ids (int64) of entries ``ks`` and the mask of those that are stored (``ks <
    end``) with a gene in ``[lo, hi)``."""
    g = tl.load(indices_ptr + ks, mask=ks < end, other=-1).to(tl.int64)
    return g, (ks < end) & (g >= lo) & (g < hi)
