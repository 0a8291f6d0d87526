"""Sparse-input linear layer (Triton) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import seed_of
from scvi_fast import reference
from scvi_fast.reference._accuracy import assert_accurate
from scvi_fast.reference._random import random_csr

# (B, G, H, K, empty rows, genes never observed)
CASES = [
    (8, 300, 32, 5, (2,), (0, 7, 299)),
    (3, 37, 7, 2, (), (36,)),
    (1, 1, 1, 1, (), ()),
    (4, 20, 40, 3, (0, 1, 2, 3), ()),  # no non-zeros at all; H over one column block
]


def _run(fn, csr, W, b, cov, W_cov, transform, gy, **kw):
    indptr, indices, values = csr
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (W, b, W_cov)]
    y = fn(indptr, indices, values, leaves[0], leaves[1], cov, leaves[2], transform, **kw)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((y * gy).sum(), wrt)
    return [y.detach()] + list(grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("transform", ["log1p", "identity"])
@pytest.mark.parametrize("method", ["gather", "dense"])
def test_matches_reference(tk, device, poison_empty, case, dtype, transform, method):
    B, G, H, K, empty_rows, unobserved = case
    gen = torch.Generator().manual_seed(seed_of(case, dtype, transform))
    index_dtype = torch.int32 if B % 2 else torch.int64  # both index widths
    csr = random_csr(gen, B, G, 0.3, max_count=2000, index_dtype=index_dtype,
                     empty_rows=empty_rows, empty_cols=unobserved, device=device)
    W = torch.randn(G, H, generator=gen, dtype=torch.float64).to(device, dtype)
    b = torch.randn(H, generator=gen, dtype=torch.float64).to(device, dtype)
    W_cov = torch.randn(K, H, generator=gen, dtype=torch.float64).to(device, dtype)
    cov = torch.randint(0, K, (B,), generator=gen).to(device)
    gy = torch.randn(B, H, generator=gen, dtype=torch.float64).to(device, dtype)
    got = _run(tk.sparse_linear, csr, W, b, cov, W_cov, transform, gy, method=method)
    names = ["y", "dW", "db", "dW_cov"]
    truth = _run(
        reference.sparse_linear, csr, W.double(), b.double(), cov, W_cov.double(), transform,
        gy.double(),
    )
    # float32: judged against torch's own float32 error on the same inputs
    low = (_run(reference.sparse_linear, csr, W, b, cov, W_cov, transform, gy)
           if dtype == torch.float32 else [None] * len(names))
    for g, t, r, n in zip(got, truth, low, names):
        assert_accurate("sparse_linear", g, t, n, low=r)
    if unobserved:
        assert (got[1][list(unobserved)] == 0).all(), "dW of a never-observed gene must be 0"


def test_without_bias_and_covariates_and_partial_grads(tk, device):
    gen = torch.Generator().manual_seed(3)
    csr = random_csr(gen, 5, 30, 0.2, dtype=torch.float64, device=device)
    W = torch.randn(30, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    W_cov = torch.randn(2, 6, generator=gen, dtype=torch.float64).to(device)  # frozen
    cov = torch.tensor([1, 0, 1, 1, 0], device=device)
    for b, c, wc in [(None, None, None), (None, cov, W_cov)]:
        y = tk.sparse_linear(*csr, W, b, c, wc, "log1p")
        y_ref = reference.sparse_linear(*csr, W, b, c, wc, "log1p")
        assert_accurate("sparse_linear", y, y_ref, "y")
        gy = torch.randn_like(y)
        (g,) = torch.autograd.grad((y * gy).sum(), W)
        (g_ref,) = torch.autograd.grad((y_ref * gy).sum(), W)
        assert_accurate("sparse_linear", g, g_ref, "dW")


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


@pytest.mark.parametrize("method", ["gather", "dense"])
def test_duplicates_and_padding_against_float64(tk, device, poison_empty, method):
    """dense == gather == the float64 reference with repeated genes, empty rows, int32 CSR
    arrays and a poisoned padded tail (float64: no rounding hides a wrong sum)."""
    gen = torch.Generator().manual_seed(seed_of("dup", method))
    B, G, H, K = 6, 19, 9, 2
    csr = random_csr(gen, B, G, 0.4, max_count=40, index_dtype=torch.int32, empty_rows=(1,),
                     shuffled=0.5, duplicates=0.5, pad=4, device=device)
    W = torch.randn(G, H, generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(H, generator=gen, dtype=torch.float64).to(device)
    W_cov = torch.randn(K, H, generator=gen, dtype=torch.float64).to(device)
    cov = torch.randint(0, K, (B,), generator=gen).to(device)
    gy = torch.randn(B, H, generator=gen, dtype=torch.float64).to(device)
    got = _run(tk.sparse_linear, csr, W, b, cov, W_cov, "log1p", gy, method=method)
    want = _run(reference.sparse_linear, csr, W, b, cov, W_cov, "log1p", gy, method="gather")
    for g, w, n in zip(got, want, ["y", "dW", "db", "dW_cov"]):
        assert_accurate("sparse_linear", g, w, n)


@pytest.mark.parametrize("method", ["gather", "dense"])
def test_padded_tail_changes_nothing(tk, device, method):
    """A poisoned tail past indptr[-1] leaves every output and gradient bit for bit the same."""
    gen = torch.Generator().manual_seed(seed_of("pad", method))
    B, G, H, K = 7, 30, 12, 3
    csr = random_csr(gen, B, G, 0.3, max_count=500, empty_rows=(2,))
    W = torch.randn(G, H, generator=gen).to(device)
    b, W_cov = torch.randn(H, generator=gen).to(device), torch.randn(K, H, generator=gen).to(device)
    cov = torch.randint(0, K, (B,), generator=gen).to(device)
    gy = torch.randn(B, H, generator=gen).to(device)
    want = _run(tk.sparse_linear, csr.to(device), W, b, cov, W_cov, "log1p", gy, method=method)
    for idx_dtype in (torch.int64, torch.int32):
        padded = csr.padded(6, G).to(device, index_dtype=idx_dtype)
        got = _run(tk.sparse_linear, padded, W, b, cov, W_cov, "log1p", gy, method=method)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_dense_method_under_bf16_autocast(tk, device):
    """Under bf16 autocast the densified batch is bf16 and the GEMM runs in bf16; the weight
    gradient comes back in the weight's dtype."""
    gen = torch.Generator().manual_seed(5)
    B, G, H = 6, 40, 8
    csr = random_csr(gen, B, G, 0.3, max_count=300, index_dtype=torch.int32, device=device)
    W = torch.randn(G, H, generator=gen).to(device).requires_grad_(True)
    b = torch.randn(H, generator=gen).to(device).requires_grad_(True)
    gy = torch.randn(B, H, generator=gen).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = tk.sparse_linear(*csr, W, b, None, None, "log1p", method="dense")
        y_ref = reference.sparse_linear(*csr, W, b, None, None, "log1p", method="dense")
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # the same bf16 inputs and GEMM: equal up to the GEMM's own summation order
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-7, atol=2**-7)
    (gW, gb) = torch.autograd.grad((y.float() * gy).sum(), [W, b])
    (gW_ref, gb_ref) = torch.autograd.grad((y_ref.float() * gy).sum(), [W, b])
    assert gW.dtype == torch.float32 and gb.dtype == torch.float32
    torch.testing.assert_close(gW, gW_ref, rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(gb, gb_ref, rtol=2**-7, atol=2**-7)


def test_every_candidate_configuration(tk, device):
    """Each gather and densify candidate a sweep or SCVI_FAST_AUTOTUNE=1 may pick is right."""
    from scvi_fast.kernels.triton import _sparse_linear as sl
    from scvi_fast.kernels.triton._configs import forced

    gen = torch.Generator().manual_seed(23)
    B, G, H, K = 5, 70, 40, 2
    csr = random_csr(gen, B, G, 0.3, max_count=300, dtype=torch.float64, empty_rows=(1,),
                     device=device)
    W = torch.randn(G, H, generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(H, generator=gen, dtype=torch.float64).to(device)
    W_cov = torch.randn(K, H, generator=gen, dtype=torch.float64).to(device)
    cov = torch.randint(0, K, (B,), generator=gen).to(device)
    gy = torch.randn(B, H, generator=gen, dtype=torch.float64).to(device)
    want = _run(reference.sparse_linear, csr, W, b, cov, W_cov, "log1p", gy)
    runs = [("segment_gather", "gather", c) for c in sl.gather_candidates(H, torch.float32)]
    runs += [("densify", "dense", c) for c in sl.densify_candidates()]
    for kernel, method, config in runs:
        with forced(kernel, config):
            got = _run(tk.sparse_linear, csr, W, b, cov, W_cov, "log1p", gy, method=method)
        for g, w, n in zip(got, want, ["y", "dW", "db", "dW_cov"]):
            assert_accurate("sparse_linear", g, w, f"{kernel} {config}: {n}")


@pytest.mark.parametrize("method", ["gather", "dense"])
def test_stacked_covariate_codes(tk, device, poison_empty, method):
    """``(B, C)`` codes offset into one stacked table: the kernel gathers the first column,
    the other columns are added as row gathers; values and every gradient match the reference
    (itself checked against a one-hot GEMM in ``tests/kernels``)."""
    gen = torch.Generator().manual_seed(11)
    B, G, H, sizes = 7, 37, 5, (3, 4, 2)
    csr = random_csr(gen, B, G, 0.3, dtype=torch.float64, device=device)
    W = torch.randn(G, H, generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(H, generator=gen, dtype=torch.float64).to(device)
    W_cov = torch.randn(sum(sizes), H, generator=gen, dtype=torch.float64).to(device)
    offsets = torch.tensor([0, 3, 7])
    cov = (torch.stack([torch.randint(0, k, (B,), generator=gen) for k in sizes], 1)
           + offsets).to(device)
    gy = torch.randn(B, H, generator=gen, dtype=torch.float64).to(device)
    got = _run(tk.sparse_linear, csr, W, b, cov, W_cov, "log1p", gy, method=method)
    truth = _run(reference.sparse_linear, csr, W, b, cov, W_cov, "log1p", gy)
    for g, t, n in zip(got, truth, ["y", "dW", "db", "dW_cov"]):
        assert_accurate("sparse_linear", g, t, n)
