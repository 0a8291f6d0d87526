"""Native ``zinb_softmax_loglik``, ``poisson_softmax_loglik`` and the NB op with a (B, G)
dispersion, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional, reference
from scvi_fast.kernels import native
from scvi_fast.reference._accuracy import (
    assert_accurate,
    nb_term_magnitudes,
    poisson_term_magnitudes,
    zinb_term_magnitudes,
)
from scvi_fast.reference._random import random_csr
from tests.kernels.conftest import poison_heap

ZINB_NAMES = ("loglik", "d_logits", "d_log_library", "d_px_r", "d_dropout")


def _counts(gen, B, G, density, max_count=5000, **kw):
    """float64 CSR counts (heavy-tailed up to ``max_count``, padded capacity) and dense copy."""
    csr = random_csr(gen, B, G, density, max_count=max_count, dtype=torch.float64, pad=7, **kw)
    return csr, csr.dense(G)


def _leaves(x, gen, rows, pi_scale=3.0, pi_shift=0.0, big_theta=False):
    """float32 (logits, log library, px_r, dropout logits) like a trained decoder's:
    theta from ~0.01 to ~100 (and 1e-4 / 4e5 in the first genes with ``big_theta``)."""
    B, G = x.shape
    logits = torch.randn(B, G, generator=gen) * 2.0
    log_lib = torch.log(x.sum(1).float() + 1.0) + 0.1 * torch.randn(B, generator=gen)
    px_r = torch.randn(*((B, G) if rows else (G,)), generator=gen) * 1.5
    if big_theta:
        px_r[..., : min(G, 2)] = torch.tensor([-9.0, 13.0])[: min(G, 2)]
    pi = torch.randn(B, G, generator=gen) * pi_scale + pi_shift
    return [t.requires_grad_() for t in (logits, log_lib, px_r, pi)]


def _grads(out, leaves, g):
    return [out.detach(), *torch.autograd.grad(out, leaves, g)]


def _check_zinb(csr64, x, gen, rows, uniform=False, **kw):
    """float64 and float32 native ZINB (value and every gradient) against the float64
    reference, elementwise within the table's multiple of the sum of |terms| of each output.
    The float32 inputs are drawn first and upcast exactly: one reference run judges both."""
    B, G = x.shape
    l32 = _leaves(x, gen, rows, **kw)
    l64 = [t.detach().double().requires_grad_() for t in l32]
    g32 = torch.full((B,), -0.37) if uniform else torch.randn(B, generator=gen)
    truth = _grads(reference.zinb_softmax_loglik(*l64, csr64), l64, g32.double())
    scales = zinb_term_magnitudes(*l64, csr64, g32)
    csr32 = csr64.to(dtype=torch.float32)
    for leaves, csr, dt in ((l64, csr64, torch.float64), (l32, csr32, torch.float32)):
        poison_heap((B, G), (B, G), (B, G), (B,), (G,), dtype=dt)
        got = _grads(native.zinb_softmax_loglik(*leaves, csr), leaves, g32.to(dt))
        for a, t, s, name in zip(got, truth, scales, ZINB_NAMES):
            assert a.dtype == dt, name
            assert_accurate("zinb_softmax_loglik", a, t, f"{name} ({dt}, rows={rows})", scale=s)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("B,G,density", [(37, 1999, 0.1), (37, 1999, 0.5), (1, 1, 1.0), (6, 4, 0.6)])
def test_zinb_odd_shapes(B, G, density, rows, gen, isa):
    csr, x = _counts(gen, B, G, density, empty_rows=(3,), empty_cols=(2,),
                     index_dtype=torch.int32 if rows else torch.int64)
    _check_zinb(csr, x, gen, rows)


@pytest.mark.parametrize("rows", [False, True])
def test_zinb_realistic_shape_uniform_upstream(rows, gen, native_ext):
    """A mean over cells (the training case) takes the saved (G,) px_r gradient path."""
    _check_zinb(*_counts(gen, 128, 3000, 0.1), gen, rows, uniform=True)


@pytest.mark.parametrize("shift", [-40.0, 40.0, -100.0, 100.0])
@pytest.mark.parametrize("rows", [False, True])
def test_zinb_extreme_dropout_logits(shift, rows, gen, native_ext):
    """Dropout logits far in either tail (softplus and sigmoid without overflow), with theta
    up to 4e5."""
    _check_zinb(*_counts(gen, 9, 301, 0.3, empty_rows=(0,)), gen, rows, pi_scale=20.0,
                pi_shift=shift, big_theta=True)


@pytest.mark.parametrize("rows", [False, True])
def test_zinb_large_theta(rows, gen, native_ext):
    _check_zinb(*_counts(gen, 17, 513, 0.2), gen, rows, big_theta=True)


def test_zinb_stored_zero_counts(gen, native_ext):
    """An explicitly stored 0 is a zero count (the reference's ``x < eps``)."""
    csr, _ = _counts(gen, 5, 40, 0.4)
    csr.values[: csr.indptr[-1] : 3] = 0.0
    _check_zinb(csr, csr.dense(40), gen, rows=True)


def test_zinb_matches_dense_scvi_tools_formula(gen, isa):
    """Against ``log_zinb_positive`` on dense tensors, as scvi-tools evaluates it."""
    csr, x = _counts(gen, 20, 300, 0.2)
    logits, log_lib, px_r, pi = (t.detach().double() for t in _leaves(x, gen, rows=False))
    mu = torch.exp(log_lib)[:, None] * torch.softmax(logits, -1)
    dense = reference.log_zinb_positive(x, mu, torch.exp(px_r), pi, 1e-8).sum(-1)
    got = native.zinb_softmax_loglik(logits, log_lib, px_r, pi, csr)
    scale = zinb_term_magnitudes(logits, log_lib, px_r, pi, csr, torch.ones(20))[0]
    assert_accurate("zinb_softmax_loglik", got, dense, "loglik vs log_zinb_positive", scale=scale)


def test_zinb_only_some_gradients_and_inference(gen, native_ext):
    csr, x = _counts(gen, 16, 40, 0.3)
    leaves = [t.detach().double() for t in _leaves(x, gen, rows=False)]
    g = torch.randn(16, generator=gen, dtype=torch.float64)
    scales = zinb_term_magnitudes(*leaves, csr, g)
    for i in range(4):  # one leaf at a time requires grad
        lv = [t.clone().requires_grad_(j == i) for j, t in enumerate(leaves)]
        (got,) = torch.autograd.grad(native.zinb_softmax_loglik(*lv, csr), lv[i], g)
        (want,) = torch.autograd.grad(reference.zinb_softmax_loglik(*lv, csr), lv[i], g)
        assert_accurate("zinb_softmax_loglik", got, want, ZINB_NAMES[i + 1], scale=scales[i + 1])
    with torch.no_grad():
        got = native.zinb_softmax_loglik(*leaves, csr)
    want = reference.zinb_softmax_loglik(*leaves, csr)
    assert_accurate("zinb_softmax_loglik", got, want, "loglik (no grad)", scale=scales[0])


def test_zinb_empty_batch_and_no_genes(native_ext):
    csr = (torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    lv = [torch.randn(0, 5), torch.zeros(0), torch.randn(5), torch.randn(0, 5)]
    lv = [t.requires_grad_() for t in lv]
    ll = native.zinb_softmax_loglik(*lv, csr)
    assert ll.shape == (0,)
    ll.sum().backward()
    assert lv[0].grad.shape == (0, 5) and (lv[2].grad == 0).all()
    csr = (torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    ll = native.zinb_softmax_loglik(torch.randn(2, 0), torch.zeros(2), torch.randn(0),
                                    torch.randn(2, 0), csr)
    assert (ll == 0).all()


def test_zinb_functional_dispatch_bf16_and_bad_input(gen):
    csr, x = _counts(gen, 8, 30, 0.3)
    leaves = [t.detach() for t in _leaves(x, gen, rows=True)]
    xs = x.to_sparse_csr().to(torch.float32)
    got = functional.zinb_softmax_loglik(*leaves, xs, impl="native")
    want = reference.zinb_softmax_loglik(*(t.double() for t in leaves), xs.to(torch.float64))
    scale = zinb_term_magnitudes(*leaves, csr, torch.ones(8))[0]
    assert_accurate("zinb_softmax_loglik", got, want, "loglik via functional", scale=scale)
    # bfloat16 logits and dropout logits are evaluated in float32, as by the reference
    z16, pi16 = leaves[0].to(torch.bfloat16), leaves[3].to(torch.bfloat16)
    got16 = native.zinb_softmax_loglik(z16, leaves[1], leaves[2], pi16, xs)
    assert got16.dtype == torch.float32
    args64 = (z16.double(), leaves[1].double(), leaves[2].double(), pi16.double())
    want16 = reference.zinb_softmax_loglik(*args64, xs.to(torch.float64))
    scale = zinb_term_magnitudes(*args64, csr, torch.ones(8))[0]
    assert_accurate("zinb_softmax_loglik", got16, want16, "loglik of bf16 inputs", scale=scale)
    indptr, indices, values = csr.to(dtype=torch.float32)
    bad = indices.clone()
    bad[indptr[-1] - 1] = 30
    with pytest.raises(RuntimeError, match="out of range"):
        native.zinb_softmax_loglik(*leaves, (indptr, bad, values))
    with pytest.raises(RuntimeError, match="px_r must have shape"):
        native.zinb_softmax_loglik(leaves[0], leaves[1], leaves[2][:, :-1], leaves[3], xs)
    with pytest.raises(RuntimeError, match="dropout_logits must have shape"):
        native.zinb_softmax_loglik(*leaves[:3], leaves[3][:-1], xs)


@pytest.mark.parametrize("rows", [False, True])
def test_reference_gradcheck_zinb(rows, gen):
    csr, x = _counts(gen, 3, 7, 0.5, max_count=30)
    leaves = [t.detach().double().requires_grad_() for t in _leaves(x, gen, rows)]
    assert torch.autograd.gradcheck(
        lambda z, l, r, p: reference.zinb_softmax_loglik(z, l, r, p, csr), leaves
    )


# ---- Poisson


def _check_poisson(csr64, x, gen, uniform=False):
    B, G = x.shape
    l32 = _leaves(x, gen, rows=False)[:2]
    l64 = [t.detach().double().requires_grad_() for t in l32]
    g32 = torch.full((B,), 0.25) if uniform else torch.randn(B, generator=gen)
    truth = _grads(reference.poisson_softmax_loglik(*l64, csr64), l64, g32.double())
    scales = poisson_term_magnitudes(*l64, csr64, g32)
    csr32 = csr64.to(dtype=torch.float32)
    for leaves, csr, dt in ((l64, csr64, torch.float64), (l32, csr32, torch.float32)):
        poison_heap((B, G), (B,), (B,), dtype=dt)
        got = _grads(native.poisson_softmax_loglik(*leaves, csr), leaves, g32.to(dt))
        for a, t, s, name in zip(got, truth, scales, ("loglik", "d_logits", "d_log_library")):
            assert a.dtype == dt, name
            assert_accurate("poisson_softmax_loglik", a, t, f"{name} ({dt})", scale=s)


@pytest.mark.parametrize("B,G,density", [(37, 1999, 0.1), (37, 1999, 0.5), (1, 1, 1.0), (6, 4, 0.6),
                                         (256, 4000, 0.1)])
def test_poisson_shapes(B, G, density, gen, isa):
    csr, x = _counts(gen, B, G, density, empty_rows=(3,), empty_cols=(2,),
                     index_dtype=torch.int32 if B % 2 else torch.int64)
    _check_poisson(csr, x, gen, uniform=B == 6)


def test_poisson_dispatch_and_bad_input(gen):
    csr, x = _counts(gen, 8, 30, 0.3)
    logits, log_lib = (t.detach() for t in _leaves(x, gen, rows=False)[:2])
    xs = x.to_sparse_csr().to(torch.float32)
    got = functional.poisson_softmax_loglik(logits.to(torch.bfloat16), log_lib, xs, impl="native")
    assert got.dtype == torch.float32
    want = reference.poisson_softmax_loglik(logits.to(torch.bfloat16).double(), log_lib.double(),
                                            xs.to(torch.float64))
    scale = poisson_term_magnitudes(logits.to(torch.bfloat16), log_lib, csr, torch.ones(8))[0]
    assert_accurate("poisson_softmax_loglik", got, want, "loglik of bf16 logits", scale=scale)
    indptr, indices, values = csr.to(dtype=torch.float32)
    bad = indices.clone()
    bad[0] = -1
    with pytest.raises(RuntimeError, match="out of range"):
        native.poisson_softmax_loglik(logits, log_lib, (indptr, bad, values))


def test_reference_gradcheck_poisson(gen):
    csr, x = _counts(gen, 3, 7, 0.5, max_count=30)
    leaves = [t.detach().double().requires_grad_() for t in _leaves(x, gen, rows=False)[:2]]
    assert torch.autograd.gradcheck(
        lambda z, l: reference.poisson_softmax_loglik(z, l, csr), leaves
    )


# ---- NB with a (B, G) dispersion (the ZINB kernel without zero inflation)


@pytest.mark.parametrize("B,G,uniform", [(37, 1999, False), (37, 1999, True), (1, 1, False)])
def test_nb_per_cell_dispersion(B, G, uniform, gen, isa):
    csr64, x = _counts(gen, B, G, 0.2, empty_rows=(3,))
    l32 = _leaves(x, gen, rows=True, big_theta=True)[:3]
    l64 = [t.detach().double().requires_grad_() for t in l32]
    g32 = torch.full((B,), 0.5) if uniform else torch.randn(B, generator=gen)
    truth = _grads(reference.nb_softmax_loglik(*l64, csr64), l64, g32.double())
    scales = nb_term_magnitudes(*l64, csr64, g32)
    for leaves, csr, dt in ((l64, csr64, torch.float64), (l32, csr64.to(dtype=torch.float32),
                                                          torch.float32)):
        poison_heap((B, G), (B, G), (B,), dtype=dt)
        got = _grads(native.nb_softmax_loglik(*leaves, csr), leaves, g32.to(dt))
        for a, t, s, n in zip(got, truth, scales, ("loglik", "d_logits", "d_lib", "d_px_r")):
            assert_accurate("nb_softmax_loglik", a, t, f"{n} ({dt})", scale=s)


def test_nb_linear_per_cell_dispersion(gen, native_ext):
    """The fused output layer + NB op with a (B, G) px_r (composed with the native NB op)."""
    B, G, H = 19, 301, 16
    csr, x = _counts(gen, B, G, 0.2)
    h = torch.randn(B, H, generator=gen, dtype=torch.float64, requires_grad=True)
    W = (0.3 * torch.randn(G, H, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.randn(G, generator=gen, dtype=torch.float64, requires_grad=True)
    lib = torch.log(x.sum(1) + 1).requires_grad_()
    r = torch.randn(B, G, generator=gen, dtype=torch.float64, requires_grad=True)
    leaves, g = [h, W, b, lib, r], torch.randn(B, generator=gen, dtype=torch.float64)
    got = _grads(native.nb_softmax_loglik_linear(*leaves, csr), leaves, g)
    want = _grads(reference.nb_softmax_loglik_linear(*leaves, csr), leaves, g)
    for a, t, n in zip(got, want, ("loglik", "dh", "dW", "db", "dlib", "dpx_r")):
        assert_accurate("nb_softmax_loglik_linear", a, t, n)
