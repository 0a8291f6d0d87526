"""Small helpers shared by the references: a CSR minibatch as three tensors.

The CSR contract of every op (reference, native, Triton): the stored entries of row ``r``
are ``indptr[r] .. indptr[r+1] - 1``, and only those are read. ``indices`` and ``values``
may be longer than ``indptr[-1]`` (a padded capacity, as in the static device buffers of a
captured training step); whatever the tail holds (NaN values, negative or out-of-range gene
ids) contributes nothing to any output or gradient. ``indptr`` and ``indices`` may be int32
or int64. The helpers below honour that without reading ``indptr[-1]`` on the host, so they
never synchronise with a GPU and allocate only shapes known from the arguments' sizes.
"""

from __future__ import annotations

import torch


def csr_parts(X_csr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(indptr, indices, values)`` of a CSR minibatch.

    Accepts a ``torch.sparse_csr_tensor``, a 3-tuple ``(indptr, indices, values)``
    or any object with ``indptr``, ``indices`` and ``values`` attributes (such as
    the loader's minibatches after ``.to(device)``).
    """
    if isinstance(X_csr, torch.Tensor):
        if X_csr.layout != torch.sparse_csr:
            raise TypeError(
                "expected a CSR count matrix; got a tensor with layout "
                f"{X_csr.layout}. Convert it with `.to_sparse_csr()` or pass "
                "(indptr, indices, values)."
            )
        return X_csr.crow_indices(), X_csr.col_indices(), X_csr.values()
    if isinstance(X_csr, (tuple, list)) and len(X_csr) == 3:
        return tuple(X_csr)  # type: ignore[return-value]
    if all(hasattr(X_csr, a) for a in ("indptr", "indices", "values")):
        return X_csr.indptr, X_csr.indices, X_csr.values
    raise TypeError(
        "X_csr must be a torch sparse CSR tensor, a tuple (indptr, indices, values) "
        f"or an object with those attributes; got {type(X_csr).__name__}"
    )


def csr_valid(indptr: torch.Tensor, capacity: int) -> torch.Tensor:
    """``(capacity,)`` bool: which slots of ``indices`` / ``values`` hold entries (``k <
    indptr[-1]``); the rest is padding."""
    slots = torch.arange(capacity, device=indptr.device, dtype=torch.int64)
    return slots < indptr[-1:].to(torch.int64)


def csr_row_ids(indptr: torch.Tensor, capacity: int) -> torch.Tensor:
    """Row id (int64) of each of the ``capacity`` slots of ``indices`` / ``values``.

    Slots past ``indptr[-1]`` (padding) get ``n_rows``, one past the last row, so that a
    caller can mask them or let them fall into a discarded segment.
    """
    slots = torch.arange(capacity, device=indptr.device, dtype=torch.int64)
    # the last row whose start is <= k: right-side search skips empty rows
    return torch.searchsorted(indptr.to(torch.int64), slots, right=True) - 1


def csr_masked(
    indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, values)`` with the padded tail replaced by gene 0 and value 0 (int64
    indices; ``torch.where`` selects, so NaN in the tail never reaches the result)."""
    valid = csr_valid(indptr, indices.numel())
    idx = torch.where(valid, indices.to(torch.int64), 0)
    val = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return idx, val


def csr_to_dense(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    n_cols: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense ``(n_rows, n_cols)`` matrix of a CSR triple (duplicates are summed; a padded
    tail past ``indptr[-1]`` is ignored)."""
    n_rows = indptr.numel() - 1
    dtype = dtype or values.dtype
    out = torch.zeros(n_rows, n_cols, dtype=dtype, device=values.device)
    if indices.numel() == 0 or n_cols == 0 or n_rows == 0:
        return out
    idx, val = csr_masked(indptr, indices, values.to(dtype))
    # padding lands on (row 0, gene 0) with value 0: adds nothing
    rows = csr_row_ids(indptr, indices.numel()).clamp_(0, n_rows - 1)
    out.index_put_((rows, idx), val, accumulate=True)
    return out
