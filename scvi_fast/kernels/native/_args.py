"""Arguments of the C++ likelihood kernels, as they take them."""

from __future__ import annotations

import torch

from scvi_fast import reference


def kernel_args(log_library, px_r, X_csr, eps, dtype) -> tuple:
    """``(log_library, px_r, indptr, indices, values, eps)`` as the C++ kernel takes them:
    contiguous, floats in ``dtype`` (see :func:`csr_args`)."""
    return (
        log_library.to(dtype).reshape(-1).contiguous(),
        px_r.to(dtype).contiguous(),
        *csr_args(X_csr, dtype),
        float(eps),
    )


def csr_args(X_csr, dtype) -> tuple:
    """``(indptr, indices, values)`` as the C++ kernels take them: contiguous, ``indptr``
    int64, ``indices`` int32 or int64, ``values`` in ``dtype``."""
    indptr, indices, values = reference.csr_parts(X_csr)
    if indices.dtype not in (torch.int32, torch.int64):
        indices = indices.to(torch.int64)
    return indptr.to(torch.int64).contiguous(), indices.contiguous(), values.to(dtype).contiguous()
