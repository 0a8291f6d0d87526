"""Random CSR count batches for checking the ops: one generator for tests and benchmarks.

:func:`random_csr` draws counts like single-cell data (most small, a heavy tail) at a given
density, with the edge cases the CSR contract of :mod:`scvi_fast.reference._csr` allows:
empty rows (cells without counts), empty columns (genes never observed), int32 or int64
``indptr`` / ``indices``, rows stored out of order or with a gene repeated, and a padded
capacity past ``indptr[-1]`` whose tail is poisoned (NaN and infinite values, negative and
out-of-range gene ids), which no op may read. Randomness comes only from the generator passed
in (a seeded ``torch.Generator`` or ``numpy.random.Generator``), never from a global state.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from scvi_fast.reference._csr import csr_to_dense

#: what the poisoned tail of a padded batch holds, repeated to its length
_BAD_VALUES = (float("nan"), float("inf"), -1.0, 1e30)


class CSR(NamedTuple):
    """A CSR batch ``(indptr, indices, values)``; a 3-tuple every op takes as ``X_csr``."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor

    def to(self, device=None, dtype: torch.dtype | None = None,
           index_dtype: torch.dtype | None = None) -> CSR:
        """This batch on ``device``, values in ``dtype``, ``indptr`` / ``indices`` in
        ``index_dtype`` (each unchanged when None)."""
        idx = {} if index_dtype is None else {"dtype": index_dtype}
        val = {} if dtype is None else {"dtype": dtype}
        return CSR(self.indptr.to(device, **idx), self.indices.to(device, **idx),
                   self.values.to(device, **val))

    def dense(self, n_cols: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The ``(n_rows, n_cols)`` matrix (repeated genes summed, the padded tail ignored)."""
        return csr_to_dense(*self, n_cols, dtype=dtype)

    def padded(self, extra: int, n_cols: int) -> CSR:
        """This batch with ``extra`` poisoned slots past ``indptr[-1]``: NaN, infinite,
        negative and huge values; gene ids below 0 and at or past ``n_cols`` (and 0)."""
        bad_genes = torch.tensor([-3, n_cols, n_cols + 7, 0, -1, 2**30])
        bad_genes = bad_genes.repeat(extra // bad_genes.numel() + 1)[:extra]
        bad_values = torch.tensor(_BAD_VALUES).repeat(extra // len(_BAD_VALUES) + 1)[:extra]
        dev = self.values.device
        return CSR(
            self.indptr,
            torch.cat([self.indices, bad_genes.to(dev, self.indices.dtype)]),
            torch.cat([self.values, bad_values.to(dev, self.values.dtype)]),
        )


def torch_generator(gen: torch.Generator | np.random.Generator) -> torch.Generator:
    """``gen`` itself, or a CPU ``torch.Generator`` seeded from a numpy ``Generator``."""
    if isinstance(gen, torch.Generator):
        return gen
    return torch.Generator().manual_seed(int(gen.integers(0, 2**63 - 1)))


def random_csr(
    gen: torch.Generator | np.random.Generator,
    n_rows: int,
    n_cols: int,
    density: float = 0.1,
    *,
    max_count: int = 1000,
    dtype: torch.dtype = torch.float32,
    index_dtype: torch.dtype = torch.int64,
    indptr_dtype: torch.dtype | None = None,
    empty_rows=(),
    empty_cols=(),
    shuffled: float = 0.0,
    duplicates: float = 0.0,
    pad: int = 0,
    device: torch.device | str | None = None,
) -> CSR:
    """A random ``(n_rows, n_cols)`` count batch in CSR form.

    Each entry is stored with probability ``density``; stored counts are log-uniform integers
    in ``[1, max_count]`` (most small, as in real data, with a tail). Rows in ``empty_rows``
    and columns in ``empty_cols`` (those within the shape) hold nothing.

    Parameters
    ----------
    gen
        Seeded ``torch.Generator`` (CPU) or ``numpy.random.Generator``: the only randomness.
    dtype, index_dtype, indptr_dtype
        Of ``values``, ``indices`` and ``indptr`` (default: ``index_dtype``).
    shuffled
        Fraction of the rows with two or more entries stored in random order (not sorted by
        gene); at least one such row when positive.
    duplicates
        Fraction of the rows with two or more entries whose every other entry repeats its
        predecessor's gene (a row with repeated genes: they add up in :meth:`CSR.dense` and in
        ``sparse_linear``; the NB op takes canonical rows only); at least one when positive.
    pad
        Slots of padded capacity past ``indptr[-1]``, poisoned (see :meth:`CSR.padded`).
    device
        Where the arrays go (drawn on the CPU).
    """
    g = torch_generator(gen)
    mask = torch.rand(n_rows, n_cols, generator=g) < density
    log_max = torch.log(torch.tensor(max_count + 1.0, dtype=torch.float64))
    u = torch.rand(n_rows, n_cols, generator=g, dtype=torch.float64)
    counts = torch.floor(torch.exp(u * log_max)).clamp_(1, max_count)
    for r in empty_rows:
        if r < n_rows:
            mask[r] = False
    for c in empty_cols:
        if c < n_cols:
            mask[:, c] = False
    rows, cols = mask.nonzero(as_tuple=True)
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    indices, values = cols.clone(), counts[rows, cols]
    if shuffled > 0:
        for a, b in _some_rows(indptr, shuffled, g):
            p = torch.randperm(b - a, generator=g) + a
            indices[a:b], values[a:b] = indices[p].clone(), values[p].clone()
    if duplicates > 0:
        for a, b in _some_rows(indptr, duplicates, g):
            indices[a + 1:b:2] = indices[a:b - 1:2].clone()
    csr = CSR(indptr.to(indptr_dtype or index_dtype), indices.to(index_dtype), values.to(dtype))
    if pad:
        csr = csr.padded(pad, n_cols)
    return csr.to(device) if device is not None else csr


def _some_rows(indptr: torch.Tensor, fraction: float, g: torch.Generator):
    """``(start, end)`` of a random ``fraction`` of the rows with two or more entries (the
    first such row always among them)."""
    sizes = indptr[1:] - indptr[:-1]
    eligible = torch.nonzero(sizes >= 2).reshape(-1)
    if eligible.numel() == 0:
        return []
    chosen = torch.rand(eligible.numel(), generator=g) < fraction
    chosen[0] = True
    return [(int(indptr[r]), int(indptr[r + 1])) for r in eligible[chosen].tolist()]
