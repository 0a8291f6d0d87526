"""``sparse_linear`` with several categorical covariates: ``(B, C)`` codes offset into one
stacked ``W_cov`` table, in every CPU back-end (Triton: ``tests/kernels_triton``).

The truth is scvi-tools' formulation in float64: the one-hot of every covariate concatenated
to ``log1p(X)`` and one dense GEMM with ``[W; W_cov]``.
"""

from __future__ import annotations

import pytest
import torch

from scvi_fast import reference
from scvi_fast.reference._accuracy import assert_accurate
from scvi_fast.reference._random import random_csr

# (B, G, H, categories per covariate, empty rows)
CASES = [(37, 1999, 9, (5, 3, 2), (4,)), (1, 1, 1, (2, 2), ()), (6, 40, 16, (7,), (0, 5))]


def stacked(gen, B, sizes):
    """``(B, C)`` codes offset into the stacked table (int64)."""
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    codes = torch.stack([torch.randint(0, k, (B,), generator=gen) for k in sizes], 1)
    return codes + offsets


def one_hot_truth(csr, W, b, cov, W_cov, transform):
    """``[f(X), onehot(cov)] @ [W; W_cov] + b`` with a dense one-hot (scvi-tools' way)."""
    indptr, indices, values = csr
    B, G = indptr.numel() - 1, W.shape[0]
    X = torch.zeros(B, G, dtype=W.dtype)
    rows = torch.repeat_interleave(torch.arange(B), indptr[1:] - indptr[:-1])
    n = int(indptr[-1])
    X.index_put_((rows, indices[:n].long()), reference._sparse_linear.apply_transform(
        values[:n].to(W.dtype), transform), accumulate=True)
    onehot = torch.zeros(B, W_cov.shape[0], dtype=W.dtype)
    onehot.scatter_add_(1, cov, torch.ones(cov.shape, dtype=W.dtype))
    return torch.cat([X, onehot], 1) @ torch.cat([W, W_cov], 0) + b


def _run(fn, csr, W, b, cov, W_cov, gy, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (W, b, W_cov)]
    y = fn(*csr, leaves[0], leaves[1], cov, leaves[2], "log1p", **kw)
    return [y.detach(), *torch.autograd.grad((y * gy).sum(), leaves)]


def _backends():
    from scvi_fast.kernels import native

    yield "torch", reference.sparse_linear
    if native.is_available():
        yield "native", native.sparse_linear


@pytest.mark.parametrize("method", ["gather", "dense"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_stacked_codes_match_one_hot_gemm(gen, case, method):
    B, G, H, sizes, empty = case
    csr = random_csr(gen, B, G, 0.2, empty_rows=empty, dtype=torch.float64, pad=3)
    W = torch.randn(G, H, generator=gen, dtype=torch.float64)
    b = torch.randn(H, generator=gen, dtype=torch.float64)
    W_cov = torch.randn(sum(sizes), H, generator=gen, dtype=torch.float64)
    cov = stacked(gen, B, sizes)
    gy = torch.randn(B, H, generator=gen, dtype=torch.float64)  # non-unit upstream gradient
    truth = _run(lambda i, j, v, *rest: one_hot_truth((i, j, v), *rest), csr, W, b, cov, W_cov, gy)
    low_inputs = [t.float() for t in (W, b, W_cov, gy)]
    csr32 = (csr[0], csr[1], csr[2].float())
    for name, fn in _backends():
        got64 = _run(fn, csr, W, b, cov, W_cov, gy, method=method)
        got32 = _run(fn, csr32, *low_inputs[:2], cov, low_inputs[2], low_inputs[3], method=method)
        ref32 = _run(reference.sparse_linear, csr32, *low_inputs[:2], cov, low_inputs[2],
                     low_inputs[3], method=method)
        for what, g64, g32, r32, t in zip(("y", "dW", "db", "dW_cov"), got64, got32, ref32, truth):
            assert_accurate("sparse_linear", g64, t, f"{name}/{what}")
            assert_accurate("sparse_linear", g32, t, f"{name}/{what}", low=r32)


def test_one_column_equals_one_dimensional_codes(gen):
    csr = random_csr(gen, 5, 30, 0.3, dtype=torch.float64)
    W, W_cov = torch.randn(30, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    cov = torch.randint(0, 3, (5,), generator=gen)
    for _, fn in _backends():
        a = fn(*csr, W, None, cov, W_cov)
        c = fn(*csr, W, None, cov[:, None], W_cov)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 2, 1), (3,)])
def test_bad_code_shapes_are_refused(gen, shape):
    csr = random_csr(gen, 5, 30, 0.3)
    W, W_cov = torch.randn(30, 4), torch.randn(3, 4)
    for _, fn in _backends():
        with pytest.raises(ValueError, match="cov must be"):
            fn(*csr, W, None, torch.zeros(shape, dtype=torch.int64), W_cov)
