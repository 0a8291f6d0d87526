"""Small helpers shared by the references: a CSR minibatch as three tensors."""

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


def csr_row_ids(indptr: torch.Tensor, nnz: int | None = None) -> torch.Tensor:
    """Row id of every stored entry (int64), from the row pointer."""
    n_rows = indptr.numel() - 1
    counts = (indptr[1:] - indptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(
        torch.arange(n_rows, device=indptr.device), counts, output_size=nnz
    )


def csr_to_dense(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    n_cols: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense ``(n_rows, n_cols)`` matrix of a CSR triple (duplicates are summed)."""
    n_rows = indptr.numel() - 1
    dtype = dtype or values.dtype
    out = torch.zeros(n_rows, n_cols, dtype=dtype, device=values.device)
    rows = csr_row_ids(indptr, values.numel())
    out.index_put_((rows, indices.to(torch.int64)), values.to(dtype), accumulate=True)
    return out
