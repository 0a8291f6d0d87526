"""Sparse-input linear layer (Triton) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import assert_close64, assert_within_torch32, random_csr, seed_of
from scvi_fast import reference

# (B, G, H, K, empty rows, genes never observed)
CASES = [
    (8, 300, 32, 5, (2,), (0, 7, 299)),
    (3, 37, 7, 2, (), (36,)),
    (1, 1, 1, 1, (), ()),
    (4, 20, 40, 3, (0, 1, 2, 3), ()),  # no non-zeros at all; H over one column block
]


def _run(fn, csr, W, b, cov, W_cov, transform, gy):
    indptr, indices, values = csr
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (W, b, W_cov)]
    y = fn(indptr, indices, values, leaves[0], leaves[1], cov, leaves[2], transform)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((y * gy).sum(), wrt)
    return [y.detach()] + list(grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("transform", ["log1p", "identity"])
def test_matches_reference(tk, device, poison_empty, case, dtype, transform):
    B, G, H, K, empty_rows, unobserved = case
    gen = torch.Generator().manual_seed(seed_of(case, dtype, transform))
    index_dtype = torch.int32 if B % 2 else torch.int64  # both index widths
    csr = random_csr(gen, B, G, 0.3, torch.float32, index_dtype, 2000, empty_rows, unobserved)
    csr = [t.to(device) for t in csr]
    W = torch.randn(G, H, generator=gen, dtype=torch.float64).to(device, dtype)
    b = torch.randn(H, generator=gen, dtype=torch.float64).to(device, dtype)
    W_cov = torch.randn(K, H, generator=gen, dtype=torch.float64).to(device, dtype)
    cov = torch.randint(0, K, (B,), generator=gen).to(device)
    gy = torch.randn(B, H, generator=gen, dtype=torch.float64).to(device, dtype)
    got = _run(tk.sparse_linear, csr, W, b, cov, W_cov, transform, gy)
    names = ["y", "dW", "db", "dW_cov"]
    if dtype == torch.float64:
        want = _run(reference.sparse_linear, csr, W, b, cov, W_cov, transform, gy)
        for g, w, n in zip(got, want, names):
            assert_close64(g, w, "sparse_linear", n)
    else:
        truth = _run(
            reference.sparse_linear, csr, W.double(), b.double(), cov, W_cov.double(), transform,
            gy.double(),
        )
        torch32 = _run(reference.sparse_linear, csr, W, b, cov, W_cov, transform, gy)
        for g, t32, t64, n in zip(got, torch32, truth, names):
            assert_within_torch32(g, t32, t64, "sparse_linear", n)
    if unobserved:
        assert (got[1][list(unobserved)] == 0).all(), "dW of a never-observed gene must be 0"


def test_without_bias_and_covariates_and_partial_grads(tk, device):
    gen = torch.Generator().manual_seed(3)
    csr = [t.to(device) for t in random_csr(gen, 5, 30, 0.2, torch.float64)]
    W = torch.randn(30, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    W_cov = torch.randn(2, 6, generator=gen, dtype=torch.float64).to(device)  # frozen
    cov = torch.tensor([1, 0, 1, 1, 0], device=device)
    for b, c, wc in [(None, None, None), (None, cov, W_cov)]:
        y = tk.sparse_linear(*csr, W, b, c, wc, "log1p")
        y_ref = reference.sparse_linear(*csr, W, b, c, wc, "log1p")
        assert_close64(y, y_ref, "sparse_linear", "y")
        gy = torch.randn_like(y)
        (g,) = torch.autograd.grad((y * gy).sum(), W)
        (g_ref,) = torch.autograd.grad((y_ref * gy).sum(), W)
        assert_close64(g, g_ref, "sparse_linear", "dW")


def test_non_integer_small_values_log1p(tk, device):
    """log1p of tiny normalised values keeps full relative precision."""
    indptr = torch.tensor([0, 3], device=device)
    indices = torch.tensor([0, 1, 2], device=device)
    values = torch.tensor([1e-10, 3e-5, 0.5], dtype=torch.float32, device=device)
    W = torch.eye(3, dtype=torch.float32, device=device)
    y = tk.sparse_linear(indptr, indices, values, W, None, None, None, "log1p")
    torch.testing.assert_close(y[0], torch.log1p(values.double()).float(), atol=0, rtol=2e-7)


def test_bad_input(tk, device):
    indptr = torch.tensor([0, 1], device=device)
    indices = torch.tensor([0], device=device)
    values = torch.ones(1, device=device)
    W = torch.ones(2, 3, device=device)
    with pytest.raises(ValueError, match="transform"):
        tk.sparse_linear(indptr, indices, values, W, None, None, None, "log")
    with pytest.raises(ValueError, match="without W_cov"):
        cov = torch.zeros(1, dtype=torch.long, device=device)
        tk.sparse_linear(indptr, indices, values, W, None, cov, None)
