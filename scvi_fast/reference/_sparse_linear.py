"""A dense layer applied to a CSR minibatch, with an optional gathered covariate."""

from __future__ import annotations

import warnings

import torch

from scvi_fast.reference._csr import csr_masked, csr_to_dense

_TRANSFORMS = ("log1p", "identity")

#: how the first layer is computed: a gather over the stored entries, or a densified batch
#: and a GEMM; ``"auto"`` is ``"dense"`` for CUDA tensors and ``"gather"`` elsewhere
METHODS = ("auto", "gather", "dense")


def apply_transform(values: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == "log1p":
        return torch.log1p(values)
    if transform == "identity":
        return values
    raise ValueError(f"transform must be one of {_TRANSFORMS}; got {transform!r}")


def resolve_method(method: str, device: torch.device | str) -> str:
    """The concrete first-layer method (``"gather"`` or ``"dense"``) for tensors on ``device``.

    On a GPU the densified batch (``B x G``, written on the device) feeds a cuBLAS GEMM on
    tensor cores (TF32 / bf16), which beats a gather of ``nnz`` weight rows there; on the CPU
    the gather does ``2 nnz H`` work instead of ``2 B G H`` and wins.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method != "auto":
        return method
    return "dense" if torch.device(device).type == "cuda" else "gather"


def covariate_rows(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``sum_c table[codes[:, c]]``: the one-hot GEMM of stacked categorical covariates.

    ``codes`` is ``(B,)`` (one covariate) or ``(B, C)`` with each column already offset into
    the stacked ``(K, H)`` table (covariate ``c``'s categories are rows ``offset_c ..
    offset_c + K_c - 1``). A row gather: embedding's backward is a sorted segment sum, far
    faster on the CPU than index_select's scatter.
    """
    codes = codes.to(torch.int64)
    rows = torch.nn.functional.embedding(codes, table)
    return rows if codes.dim() == 1 else rows.sum(1)


def check_cov(cov: torch.Tensor | None, W_cov: torch.Tensor | None, n_rows: int) -> None:
    """``cov`` is ``(B,)`` or ``(B, C)`` and comes with ``W_cov`` (every back-end's check)."""
    if cov is None:
        return
    if W_cov is None:
        raise ValueError("cov was given without W_cov")
    if cov.dim() not in (1, 2) or cov.shape[0] != n_rows:
        raise ValueError(f"cov must be ({n_rows},) or ({n_rows}, C) codes; got {tuple(cov.shape)}")


def split_cov(cov: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(first column (B,), the other columns (B, C-1) or None)`` of checked codes.

    The fast back-ends gather the first covariate inside their fused kernel and add the
    others' rows with :func:`covariate_rows` (one gather per extra covariate).
    """
    if cov is None or cov.dim() == 1:
        return cov, None
    return cov[:, 0], (cov[:, 1:] if cov.shape[1] > 1 else None)


def sparse_linear(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    cov: torch.Tensor | None = None,
    W_cov: torch.Tensor | None = None,
    transform: str = "log1p",
    method: str = "auto",
) -> torch.Tensor:
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR ``X`` of shape ``(B, G)``.

    Weight layout is gene-major: ``W`` is ``(G, H)`` (the transpose of
    ``nn.Linear.weight``) so that the H-vector of one gene is contiguous, and
    ``W_cov`` is ``(K, H)``, one contiguous row per covariate category. The
    covariate term equals concatenating a one-hot of ``cov`` to the input and
    running the wider GEMM, as scvi-tools does. ``cov`` may also be ``(B, C)``: C categorical
    covariates whose codes are offset into one stacked table, ``y += sum_c W_cov[cov[:, c]]``
    (several one-hot blocks, see :func:`covariate_rows`). No gradient flows to the data.
    Entries past ``indptr[-1]`` are ignored (see :mod:`scvi_fast.reference._csr`).

    ``method="gather"`` multiplies the sparse matrix (``torch.sparse.mm``); ``"dense"``
    scatters ``f(values)`` into a dense ``(B, G)`` matrix (repeated genes of a row add up)
    and runs a dense GEMM, in the autocast dtype under autocast.
    """
    check_cov(cov, W_cov, indptr.numel() - 1)
    method = resolve_method(method, W.device)
    n_rows, G = indptr.numel() - 1, W.shape[0]
    idx, val = csr_masked(indptr, indices, values.to(W.dtype))
    fx = apply_transform(val, transform)  # f(0) = 0: the padding stays 0
    if method == "dense":
        X = csr_to_dense(indptr, idx, fx, G)
        y = X @ W
    elif n_rows > 0:
        # the padded tail (now gene 0, value 0) forms one extra row whose output is dropped
        crow = torch.cat([indptr.to(torch.int64), indptr.new_full((1,), idx.numel(),
                                                                  dtype=torch.int64)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            X = torch.sparse_csr_tensor(crow, idx, fx, size=(n_rows + 1, G),
                                        check_invariants=False)
        y = torch.sparse.mm(X, W)[:n_rows]
    else:
        y = W.new_zeros(0, W.shape[1])
    if b is not None:
        y = y + b.to(y.dtype)
    if cov is not None:
        y = y + covariate_rows(cov, W_cov).to(y.dtype)
    return y
