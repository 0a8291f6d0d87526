"""A dense layer applied to a CSR minibatch, with an optional gathered covariate."""

from __future__ import annotations

import warnings

import torch

_TRANSFORMS = ("log1p", "identity")


def apply_transform(values: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == "log1p":
        return torch.log1p(values)
    if transform == "identity":
        return values
    raise ValueError(f"transform must be one of {_TRANSFORMS}; got {transform!r}")


def sparse_linear(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    cov: torch.Tensor | None = None,
    W_cov: torch.Tensor | None = None,
    transform: str = "log1p",
) -> torch.Tensor:
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR ``X`` of shape ``(B, G)``.

    Weight layout is gene-major: ``W`` is ``(G, H)`` (the transpose of
    ``nn.Linear.weight``) so that the H-vector of one gene is contiguous, and
    ``W_cov`` is ``(K, H)``, one contiguous row per covariate category. The
    covariate term equals concatenating a one-hot of ``cov`` to the input and
    running the wider GEMM, as scvi-tools does. No gradient flows to the data.
    """
    n_rows = indptr.numel() - 1
    fx = apply_transform(values.to(W.dtype), transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        X = torch.sparse_csr_tensor(
            indptr.to(torch.int64),
            indices.to(torch.int64),
            fx,
            size=(n_rows, W.shape[0]),
            check_invariants=False,
        )
    y = torch.sparse.mm(X, W) if n_rows > 0 else W.new_zeros(0, W.shape[1])
    if b is not None:
        y = y + b
    if cov is not None:
        if W_cov is None:
            raise ValueError("cov was given without W_cov")
        y = y + W_cov.index_select(0, cov.reshape(-1).to(torch.int64))
    return y
