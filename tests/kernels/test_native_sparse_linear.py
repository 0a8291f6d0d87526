"""Native ``sparse_linear`` against the pure-PyTorch reference (value and every gradient)."""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional, reference
from scvi_fast.kernels import native
from scvi_fast.reference._accuracy import assert_accurate
from scvi_fast.reference._random import random_csr
from tests.kernels.conftest import poison_heap

OP = "sparse_linear"


def _params(G, H, K, gen, bias=True):
    """float32 parameters (and their exact float64 copies), requiring grad."""
    W = torch.randn(G, H, generator=gen) / G**0.5
    b = torch.randn(H, generator=gen) if bias else None
    W_cov = torch.randn(K, H, generator=gen) if K else None
    p32 = [t.requires_grad_() if t is not None else None for t in (W, b, W_cov)]
    p64 = [t.detach().double().requires_grad_() if t is not None else None for t in p32]
    return p32, p64


def _run(fn, csr, params, cov, transform, dy):
    W, b, W_cov = params
    y = fn(*csr, W, b, cov, W_cov, transform)
    leaves = [t for t in params if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach(), *grads]


def _counts(gen, B, G, density, max_count=5000, **kw):
    """float64 CSR counts (see :func:`random_csr` for the keywords)."""
    return random_csr(gen, B, G, density, max_count=max_count, dtype=torch.float64, **kw)


def _check(csr64, shape, H, K, transform, gen, bias=True):
    """Kernel in float64 and float32 against the float64 reference and torch's float32, on
    float64 CSR counts (any entry order, duplicates allowed).

    Inputs are drawn in float32 and upcast exactly, so one float64 reference run is
    the truth for both precisions.
    """
    B, G = shape
    cov = torch.randint(0, K, (B,), generator=gen) if K else None
    p32, p64 = _params(G, H, K, gen, bias)
    dy32 = torch.randn(B, H, generator=gen)
    dy64 = dy32.double()
    csr32 = csr64.to(dtype=torch.float32)
    names = ["y", "dW"] + (["db"] if bias else []) + (["dW_cov"] if K else [])

    truth = _run(reference.sparse_linear, csr64, p64, cov, transform, dy64)
    poison_heap((B, H), (G, H), dtype=torch.float64)
    got64 = _run(native.sparse_linear, csr64, p64, cov, transform, dy64)
    for a, t, name in zip(got64, truth, names):
        assert_accurate(OP, a, t, name)

    ref32 = _run(reference.sparse_linear, csr32, p32, cov, transform, dy32)
    poison_heap((B, H), (G, H))
    got32 = _run(native.sparse_linear, csr32, p32, cov, transform, dy32)
    for a, r, t, name in zip(got32, ref32, truth, names):
        assert_accurate(OP, a, t, name, low=r)
    return got32


# The Census shape at 10%; the density extremes on 256 of its cells (test time).
@pytest.mark.parametrize("B,density,H", [(1024, 0.1, 512), (256, 0.02, 128), (256, 0.3, 128)])
def test_realistic_shape(B, density, H, gen, native_ext):
    _check(_counts(gen, B, 8000, density), (B, 8000), H, K=0, transform="log1p", gen=gen)


@pytest.mark.parametrize(
    "B,G,H,density",
    [(37, 1999, 100, 0.1), (37, 1999, 33, 0.3), (1, 1, 1, 1.0), (5, 3, 70, 0.5)],
)
@pytest.mark.parametrize("transform", ["log1p", "identity"])
def test_odd_shapes(B, G, H, density, transform, gen, isa):
    # rows without counts and a gene never observed, where the shape has room for them
    csr = _counts(gen, B, G, density, max_count=3000, empty_rows=(2,), empty_cols=(1,))
    got = _check(csr, (B, G), H, K=4, transform=transform, gen=gen)
    if G > 1 and B > 0:
        assert (got[1][1] == 0).all(), "dW of a gene never observed must be exactly zero"


# The forward takes a fast path for blocks of rows whose indices are sorted
# (non-decreasing); these cover the other path, both paths in one batch, several
# gene tiles with a ragged right edge of H, and repeated indices (which add).
@pytest.mark.parametrize("B,G,H", [(700, 3000, 700), (1100, 500, 64), (9, 40, 5)])
@pytest.mark.parametrize("layout", ["unsorted_rows", "duplicates", "sorted"])
def test_entry_order_and_duplicates(B, G, H, layout, gen, isa):
    # 30% of the rows: some rows of a block, some whole blocks
    kw = {"unsorted_rows": dict(shuffled=0.3), "duplicates": dict(duplicates=0.3)}.get(layout, {})
    csr = _counts(gen, B, G, 0.05, max_count=50, **kw)
    _check(csr, (B, G), H, K=3, transform="log1p", gen=gen)


@pytest.mark.parametrize("n_threads", [1, 3, 5])
def test_thread_counts_give_identical_results(n_threads, gen, native_ext):
    """Rows and genes are split between threads by entry counts; any split gives the
    same sums (each gene's entries are summed in row order by one thread)."""
    # a run of genes never observed
    indptr, indices, values = random_csr(gen, 301, 700, 0.08, max_count=40, empty_rows=(5, 6),
                                         empty_cols=range(20))
    W = torch.randn(700, 70, generator=gen, requires_grad=True)
    dy = torch.randn(301, 70, generator=gen)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, n_threads):
            torch.set_num_threads(nt)
            y = native.sparse_linear(indptr, indices, values, W, None)
            (dW,) = torch.autograd.grad(y, [W], dy)
            outs.append((y, dW))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (outs[1][1][:20] == 0).all()


def test_empty_batch(native_ext):
    W = torch.randn(17, 8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    empty = (torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    y = native.sparse_linear(*empty, W, b)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert (W.grad == 0).all() and (b.grad == 0).all()


def test_no_bias_no_covariates_int32_indices(gen, isa):
    csr = _counts(gen, 64, 300, 0.2, index_dtype=torch.int32)
    _check(csr, (64, 300), 40, K=0, transform="log1p", gen=gen, bias=False)


def test_covariates_only_some_gradients(gen, native_ext):
    """Only the gradients that are asked for are computed; the others stay None."""
    indptr, indices, values = random_csr(gen, 20, 50, 0.3)
    W = torch.randn(50, 16, generator=gen)
    b = torch.randn(16, generator=gen)
    W_cov = torch.randn(3, 16, generator=gen, requires_grad=True)
    cov = torch.randint(0, 3, (20,), generator=gen)
    y = native.sparse_linear(indptr, indices, values, W, b, cov, W_cov)
    dy = torch.randn(20, 16, generator=gen)
    y.backward(dy)
    expected = torch.zeros(3, 16).index_add_(0, cov, dy)
    torch.testing.assert_close(W_cov.grad, expected)


def test_functional_dispatch_native(gen):
    indptr, indices, values = random_csr(gen, 8, 30, 0.3)
    W = torch.randn(30, 12, generator=gen)
    b = torch.randn(12, generator=gen)
    y = functional.sparse_linear(indptr, indices, values, W, b, impl="native")
    torch.testing.assert_close(y, reference.sparse_linear(indptr, indices, values, W, b))
    assert functional.resolve_impl("auto", "cpu") == "native"


def test_rejects_bad_input(gen, native_ext):
    indptr, indices, values = random_csr(gen, 4, 10, 0.5)
    W = torch.randn(10, 8, generator=gen)
    bad = indices.clone()
    bad[0] = 10
    with pytest.raises(RuntimeError, match="out of range"):
        native.sparse_linear(indptr, bad, values, W, None)
    # indptr[:-1] is a valid batch of 3 rows with a padded tail; past the capacity is not
    past_end = indptr.clone()
    past_end[-1] = indices.numel() + 1
    with pytest.raises(RuntimeError, match="indptr"):
        native.sparse_linear(past_end, indices, values, W, None)
    with pytest.raises(RuntimeError, match="W must be"):
        native.sparse_linear(indptr, indices, values.int(), W.int(), None)
    with pytest.raises(ValueError, match="W_cov"):
        native.sparse_linear(indptr, indices, values, W, None, cov=torch.zeros(4, dtype=torch.long))


def test_reference_gradcheck(gen):
    indptr, indices, values = _counts(gen, 4, 6, 0.5, max_count=20)
    W = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    W_cov = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    cov = torch.tensor([0, 1, 1, 0])
    assert torch.autograd.gradcheck(
        lambda W, b, Wc: reference.sparse_linear(indptr, indices, values, W, b, cov, Wc),
        (W, b, W_cov),
    )
