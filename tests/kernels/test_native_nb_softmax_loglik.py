"""Native ``nb_softmax_loglik`` against the reference and the dense scvi-tools formula."""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional, reference
from scvi_fast.kernels import native
from tests.kernels.conftest import csr_of, poison_heap, random_counts
from tests.kernels.tolerances import assert_f32_close, assert_f64_close, rel_err

OP = "nb_softmax_loglik"
NAMES = ("loglik", "d_logits", "d_log_library", "d_px_r")


def _inputs(x, gen):
    """float32 leaves (logits, log library, px_r) like a trained decoder's, requiring grad."""
    B, G = x.shape
    logits = torch.randn(B, G, generator=gen) * 2.0
    log_lib = torch.log(x.sum(1).float() + 1.0) + 0.1 * torch.randn(B, generator=gen)
    px_r = torch.randn(G, generator=gen) * 1.5  # theta from ~0.01 to ~100
    return [t.requires_grad_() for t in (logits, log_lib, px_r)]


def _run(fn, leaves, csr, g):
    ll = fn(*leaves, csr)
    grads = torch.autograd.grad(ll, leaves, g)
    return [ll.detach(), *grads]


def _check(x, gen, uniform_upstream=False, index_dtype=torch.int64):
    B = x.shape[0]
    l32 = _inputs(x, gen)
    l64 = [t.detach().double().requires_grad_() for t in l32]
    g32 = torch.full((B,), -0.37) if uniform_upstream else torch.randn(B, generator=gen)
    csr64 = csr_of(x, torch.float64, index_dtype)
    csr32 = (csr64[0], csr64[1], csr64[2].float())

    truth = _run(reference.nb_softmax_loglik, l64, csr64, g32.double())
    poison_heap(x.shape, (B,), (x.shape[1],), dtype=torch.float64)
    got64 = _run(native.nb_softmax_loglik, l64, csr64, g32.double())
    for a, t, name in zip(got64, truth, NAMES):
        assert_f64_close(OP, a, t, name)

    ref32 = _run(reference.nb_softmax_loglik, l32, csr32, g32)
    poison_heap(x.shape, (B,), (x.shape[1],))
    got32 = _run(native.nb_softmax_loglik, l32, csr32, g32)
    for a, r, t, name in zip(got32, ref32, truth, NAMES):
        assert_f32_close(OP, a, r, t, name)


# The float64 reference (dense lgamma / digamma over B x G) dominates the test time,
# so the Census shape runs at 10% and the density extremes on 256 of its cells.
@pytest.mark.parametrize("B,density", [(1024, 0.1), (256, 0.02), (256, 0.3)])
def test_realistic_shape(B, density, gen, native_ext):
    _check(random_counts(B, 8000, density, gen), gen)


def test_uniform_upstream_gradient(gen, native_ext):
    """A mean over cells (the training case) takes the saved px_r gradient path."""
    _check(random_counts(256, 3000, 0.1, gen), gen, uniform_upstream=True)


@pytest.mark.parametrize("B,G,density", [(37, 1999, 0.1), (37, 1999, 0.5), (1, 1, 1.0), (6, 4, 0.6)])
@pytest.mark.parametrize("uniform", [False, True])
def test_odd_shapes(B, G, density, uniform, gen, isa):
    x = random_counts(B, G, density, gen, empty_rows=(3,), empty_cols=(2,))
    _check(x, gen, uniform_upstream=uniform, index_dtype=torch.int32 if uniform else torch.int64)


def test_empty_batch(native_ext):
    logits = torch.randn(0, 5, requires_grad=True)
    px_r = torch.randn(5, requires_grad=True)
    csr = (torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    ll = native.nb_softmax_loglik(logits, torch.zeros(0), px_r, csr)
    assert ll.shape == (0,)
    ll.sum().backward()
    assert logits.grad.shape == (0, 5) and (px_r.grad == 0).all()


def test_matches_dense_scvi_tools_formula(gen, isa):
    """Against ``log_nb_positive`` evaluated on dense tensors, as scvi-tools does."""
    x = random_counts(50, 700, 0.2, gen)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    mu = torch.exp(log_lib)[:, None] * torch.softmax(logits, -1)
    dense = reference.log_nb_positive(x, mu, torch.exp(px_r), 1e-8).sum(-1)
    got = native.nb_softmax_loglik(logits, log_lib, px_r, csr_of(x, torch.float64))
    assert_f64_close(OP, got, dense, "loglik vs log_nb_positive")


def test_counts_exact_up_to_2_pow_24(native_ext):
    """Counts near 2^24 stored in float32 give the float64 answer to float32 rounding."""
    big = torch.tensor([2.0**24, 2.0**24 - 1, 12_345_677.0, 3.0, 1.0])
    x = torch.zeros(2, 6, dtype=torch.float64)
    x[0, :5] = big.double()
    x[1, [1, 4]] = torch.tensor([2.0**24 - 3, 7.0], dtype=torch.float64)
    assert (x.float().double() == x).all()  # the counts themselves are exact in float32
    logits = torch.tensor([[3.0, 2.5, 2.0, -1.0, -2.0, 0.5], [0.1, 4.0, 0.0, 0.2, -3.0, 1.0]])
    log_lib = torch.log(x.sum(1)).float()
    px_r = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5])
    got32 = native.nb_softmax_loglik(logits, log_lib, px_r, csr_of(x, torch.float32))
    truth = reference.nb_softmax_loglik(
        logits.double(), log_lib.double(), px_r.double(), csr_of(x, torch.float64)
    )
    # The per-cell sums are ~1e8; float32 rounding of the result is 2^-24 relative.
    assert rel_err(got32, truth) < 4 * 2.0**-24


def test_log_library_gradient_only(gen, native_ext):
    x = random_counts(16, 40, 0.3, gen)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    log_lib.requires_grad_()
    csr = csr_of(x, torch.float64)
    g = torch.randn(16, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(native.nb_softmax_loglik(logits, log_lib, px_r, csr), log_lib, g)
    (want,) = torch.autograd.grad(reference.nb_softmax_loglik(logits, log_lib, px_r, csr), log_lib, g)
    assert_f64_close(OP, got, want, "d_log_library")


def test_no_gradients_inference(gen, native_ext):
    x = random_counts(16, 40, 0.3, gen)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    csr = csr_of(x, torch.float64)
    with torch.no_grad():
        got = native.nb_softmax_loglik(logits, log_lib, px_r, csr)
    want = reference.nb_softmax_loglik(logits, log_lib, px_r, csr)
    assert_f64_close(OP, got, want, "loglik (no grad)")


def test_functional_dispatch_and_sparse_tensor_input(gen):
    x = random_counts(8, 30, 0.3, gen)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    xs = x.to_sparse_csr()
    got = functional.nb_softmax_loglik(logits, log_lib, px_r, xs, impl="native")
    want = functional.nb_softmax_loglik(logits, log_lib, px_r, xs, impl="torch")
    assert_f64_close(OP, got, want, "loglik via functional")


def test_rejects_bad_input(gen, native_ext):
    x = random_counts(4, 10, 0.5, gen)
    indptr, indices, values = csr_of(x, torch.float32)
    logits, log_lib, px_r = (t.detach() for t in _inputs(x, gen))
    bad = indices.clone()
    bad[-1] = -1
    with pytest.raises(RuntimeError, match="out of range"):
        native.nb_softmax_loglik(logits, log_lib, px_r, (indptr, bad, values))
    with pytest.raises(RuntimeError, match="px_r must have shape"):
        native.nb_softmax_loglik(logits, log_lib, px_r[:-1], (indptr, indices, values))


def test_reference_gradcheck(gen):
    x = random_counts(3, 7, 0.5, gen, max_count=30)
    csr = csr_of(x, torch.float64)
    leaves = [t.detach().double().requires_grad_() for t in _inputs(x, gen)]
    assert torch.autograd.gradcheck(
        lambda lg, ll, r: reference.nb_softmax_loglik(lg, ll, r, csr), leaves
    )
