"""Native ``nb_softmax_loglik`` against the reference and the dense scvi-tools formula."""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional, reference
from scvi_fast.kernels import native
from scvi_fast.reference._accuracy import assert_accurate, nb_term_magnitudes, rel_err
from scvi_fast.reference._random import random_csr
from tests.kernels.conftest import poison_heap

OP = "nb_softmax_loglik"
NAMES = ("loglik", "d_logits", "d_log_library", "d_px_r")


def _counts(gen, B, G, density, max_count=5000, **kw):
    """float64 CSR counts (heavy-tailed up to ``max_count``) and their dense copy."""
    csr = random_csr(gen, B, G, density, max_count=max_count, dtype=torch.float64, **kw)
    return csr, csr.dense(G)


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


def _check(csr64, x, gen, uniform_upstream=False):
    """float64 and float32 kernels against the float64 reference, elementwise within the
    table's multiple of the sum of |terms| of each output.

    The float32 inputs are drawn first and upcast exactly, so one float64 reference run is
    the truth for both precisions.
    """
    B = x.shape[0]
    l32 = _inputs(x, gen)
    l64 = [t.detach().double().requires_grad_() for t in l32]
    g32 = torch.full((B,), -0.37) if uniform_upstream else torch.randn(B, generator=gen)
    csr32 = csr64.to(dtype=torch.float32)

    truth = _run(reference.nb_softmax_loglik, l64, csr64, g32.double())
    scales = nb_term_magnitudes(*l64, csr64, g32)
    poison_heap(x.shape, (B,), (x.shape[1],), dtype=torch.float64)
    got64 = _run(native.nb_softmax_loglik, l64, csr64, g32.double())
    poison_heap(x.shape, (B,), (x.shape[1],))
    got32 = _run(native.nb_softmax_loglik, l32, csr32, g32)
    for got in (got64, got32):
        for a, t, s, name in zip(got, truth, scales, NAMES):
            assert_accurate(OP, a, t, name, scale=s)


# The float64 reference (dense lgamma / digamma over B x G) dominates the test time,
# so the Census shape runs at 10% and the density extremes on 256 of its cells.
@pytest.mark.parametrize("B,density", [(1024, 0.1), (256, 0.02), (256, 0.3)])
def test_realistic_shape(B, density, gen, native_ext):
    _check(*_counts(gen, B, 8000, density), gen)


def test_uniform_upstream_gradient(gen, native_ext):
    """A mean over cells (the training case) takes the saved px_r gradient path."""
    _check(*_counts(gen, 256, 3000, 0.1), gen, uniform_upstream=True)


@pytest.mark.parametrize("B,G,density", [(37, 1999, 0.1), (37, 1999, 0.5), (1, 1, 1.0), (6, 4, 0.6)])
@pytest.mark.parametrize("uniform", [False, True])
def test_odd_shapes(B, G, density, uniform, gen, isa):
    csr, x = _counts(gen, B, G, density, empty_rows=(3,), empty_cols=(2,),
                     index_dtype=torch.int32 if uniform else torch.int64)
    _check(csr, x, gen, uniform_upstream=uniform)


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
    csr, x = _counts(gen, 50, 700, 0.2)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    mu = torch.exp(log_lib)[:, None] * torch.softmax(logits, -1)
    dense = reference.log_nb_positive(x, mu, torch.exp(px_r), 1e-8).sum(-1)
    got = native.nb_softmax_loglik(logits, log_lib, px_r, csr)
    scale = nb_term_magnitudes(logits, log_lib, px_r, csr, torch.ones(50))[0]
    assert_accurate(OP, got, dense, "loglik vs log_nb_positive", scale=scale)


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
    csr = x.to_sparse_csr()
    got32 = native.nb_softmax_loglik(logits, log_lib, px_r, csr.to(torch.float32))
    truth = reference.nb_softmax_loglik(logits.double(), log_lib.double(), px_r.double(), csr)
    # The per-cell sums are ~1e8; float32 rounding of the result is 2^-24 relative.
    assert rel_err(got32, truth) < 4 * 2.0**-24


def _scale(inputs, csr, w, output):
    """The term magnitudes of output ``output`` (0: loglik, 1: d_logits, 2: d_log_library)."""
    return nb_term_magnitudes(*inputs, csr, w)[output]


def test_log_library_gradient_only(gen, native_ext):
    csr, x = _counts(gen, 16, 40, 0.3)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    log_lib.requires_grad_()
    g = torch.randn(16, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(native.nb_softmax_loglik(logits, log_lib, px_r, csr), log_lib, g)
    (want,) = torch.autograd.grad(reference.nb_softmax_loglik(logits, log_lib, px_r, csr), log_lib, g)
    scale = _scale((logits, log_lib, px_r), csr, g, 2)
    assert_accurate(OP, got, want, "d_log_library", scale=scale)


def test_no_gradients_inference(gen, native_ext):
    csr, x = _counts(gen, 16, 40, 0.3)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    with torch.no_grad():
        got = native.nb_softmax_loglik(logits, log_lib, px_r, csr)
    want = reference.nb_softmax_loglik(logits, log_lib, px_r, csr)
    scale = _scale((logits, log_lib, px_r), csr, torch.ones(16), 0)
    assert_accurate(OP, got, want, "loglik (no grad)", scale=scale)


def test_functional_dispatch_sparse_tensor_and_bf16_logits(gen):
    csr, x = _counts(gen, 8, 30, 0.3)
    logits, log_lib, px_r = (t.detach().double() for t in _inputs(x, gen))
    xs = x.to_sparse_csr()
    got = functional.nb_softmax_loglik(logits, log_lib, px_r, xs, impl="native")
    want = functional.nb_softmax_loglik(logits, log_lib, px_r, xs, impl="torch")
    scale = _scale((logits, log_lib, px_r), csr, torch.ones(8), 0)
    assert_accurate(OP, got, want, "loglik via functional", scale=scale)
    # bfloat16 logits are evaluated in float32, by the native back-end as by the reference
    z16 = logits.to(torch.bfloat16)
    got16 = native.nb_softmax_loglik(z16, log_lib.float(), px_r.float(), xs.to(torch.float32))
    want16 = reference.nb_softmax_loglik(z16.double(), log_lib, px_r, xs)
    assert got16.dtype == torch.float32
    scale = _scale((z16, log_lib, px_r), csr, torch.ones(8), 0)
    assert_accurate(OP, got16, want16, "loglik of bf16 logits", scale=scale)


def test_rejects_bad_input(gen, native_ext):
    csr, x = _counts(gen, 4, 10, 0.5)
    indptr, indices, values = csr.to(dtype=torch.float32)
    logits, log_lib, px_r = (t.detach() for t in _inputs(x, gen))
    bad = indices.clone()
    bad[-1] = -1
    with pytest.raises(RuntimeError, match="out of range"):
        native.nb_softmax_loglik(logits, log_lib, px_r, (indptr, bad, values))
    with pytest.raises(RuntimeError, match="px_r must have shape"):
        native.nb_softmax_loglik(logits, log_lib, px_r[:-1], (indptr, indices, values))


def test_reference_gradcheck(gen):
    csr, x = _counts(gen, 3, 7, 0.5, max_count=30)
    leaves = [t.detach().double().requires_grad_() for t in _inputs(x, gen)]
    assert torch.autograd.gradcheck(
        lambda lg, ll, r: reference.nb_softmax_loglik(lg, ll, r, csr), leaves
    )
