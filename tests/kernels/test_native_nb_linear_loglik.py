"""The decoder output layer fused with the NB likelihood (native) against the reference.

``nb_softmax_loglik_linear(h, W, b, ...)`` must equal ``nb_softmax_loglik(h @ W.T + b, ...)``
in value and in every gradient (h, W, b, log library, px_r), for uniform upstream
gradients (the training case: the stored column sum and px_r gradient are scaled) and
per-cell ones (the scaling moves onto h and the px_r gradient re-runs the kernel), with
and without a bias, through a retained graph twice, and with poisoned scratch buffers.
"""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional, reference
from scvi_fast.kernels import native
from scvi_fast.kernels._scratch import POOL, ScratchPool
from scvi_fast.reference._accuracy import assert_accurate, nb_term_magnitudes
from scvi_fast.reference._random import random_csr

OP = "nb_softmax_loglik_linear"
NAMES = ("loglik", "d_h", "d_weight", "d_bias", "d_log_library", "d_px_r")


def _counts(gen, B, G, density, max_count=5000, **kw):
    """float64 CSR counts and their dense copy."""
    csr = random_csr(gen, B, G, density, max_count=max_count, dtype=torch.float64, **kw)
    return csr, csr.dense(G)


def _leaves(x, H, gen, bias=True):
    B, G = x.shape
    h = torch.relu(torch.randn(B, H, generator=gen))  # post-ReLU like the decoder's
    W = torch.randn(G, H, generator=gen) / H**0.5 * 2.0
    b = torch.randn(G, generator=gen) if bias else None
    log_lib = torch.log(x.sum(1).float() + 1.0) + 0.1 * torch.randn(B, generator=gen)
    px_r = torch.randn(G, generator=gen) * 1.5
    return [t.requires_grad_() if t is not None else None for t in (h, W, b, log_lib, px_r)]


def _run(fn, leaves, csr, g, retain=False):
    ll = fn(*leaves, csr)
    need = [t for t in leaves if t is not None]
    grads = list(torch.autograd.grad(ll, need, g, retain_graph=retain))
    out = [ll.detach()]
    for t in leaves:
        out.append(grads.pop(0) if t is not None else None)
    return out, ll


def _poison_pool(B, G, dtype):
    """Fill the scratch pool with NaN buffers of the op's shape: unwritten entries show."""
    POOL.clear()
    for _ in range(POOL.per_key):
        POOL.give(torch.full((B, G), float("nan"), dtype=dtype))


def _check(csr64, x, H, gen, uniform, bias=True, twice=False):
    B, G = x.shape
    l32 = _leaves(x, H, gen, bias)
    l64 = [t.detach().double().requires_grad_() if t is not None else None for t in l32]
    g32 = torch.full((B,), -0.37) if uniform else torch.randn(B, generator=gen)
    csr32 = csr64.to(dtype=torch.float32)

    truth, _ = _run(reference.nb_softmax_loglik_linear, l64, csr64, g32.double())
    _poison_pool(B, G, torch.float64)
    got64, ll = _run(native.nb_softmax_loglik_linear, l64, csr64, g32.double(), retain=twice)
    runs = [got64]
    if twice:  # second backward through the retained graph recomputes the gradient buffer
        _poison_pool(B, G, torch.float64)
        again = torch.autograd.grad(ll, [t for t in l64 if t is not None], g32.double())
        it = iter(again)
        runs.append([got64[0]] + [next(it) if t is not None else None for t in l64])
    for got in runs:
        for a, t, name in zip(got, truth, NAMES):
            if t is not None:
                assert_accurate(OP, a, t, name)

    ref32, _ = _run(reference.nb_softmax_loglik_linear, l32, csr32, g32)
    _poison_pool(B, G, torch.float32)
    got32, _ = _run(native.nb_softmax_loglik_linear, l32, csr32, g32)
    for a, r, t, name in zip(got32, ref32, truth, NAMES):
        if t is not None:
            assert_accurate(OP, a, t, name, low=r)


@pytest.mark.parametrize("uniform", [True, False])
def test_census_shape(uniform, gen, native_ext):
    _check(*_counts(gen, 256, 8000, 0.1, max_count=300), 512, gen, uniform)


@pytest.mark.parametrize("B,G,H,density", [(37, 1999, 23, 0.1), (6, 4, 3, 0.6), (1, 1, 1, 1.0)])
@pytest.mark.parametrize("uniform", [False, True])
def test_odd_shapes(B, G, H, density, uniform, gen, isa):
    csr, x = _counts(gen, B, G, density, empty_rows=(3,), empty_cols=(2,),
                     index_dtype=torch.int32 if uniform else torch.int64)
    _check(csr, x, H, gen, uniform)


@pytest.mark.parametrize("uniform", [False, True])
def test_without_bias(uniform, gen, native_ext):
    _check(*_counts(gen, 29, 301, 0.2), 17, gen, uniform, bias=False)


@pytest.mark.parametrize("uniform", [False, True])
def test_backward_twice_through_retained_graph(uniform, gen, native_ext):
    _check(*_counts(gen, 29, 301, 0.2), 17, gen, uniform, twice=True)


def test_only_some_gradients(gen, native_ext):
    """Frozen weights (e.g. query training of a reference model): only what is asked for."""
    csr, x = _counts(gen, 19, 211, 0.2)
    h, W, b, lib, r = _leaves(x, 13, gen)
    W.requires_grad_(False)
    b.requires_grad_(False)
    csr = csr.to(dtype=torch.float32)
    ll = native.nb_softmax_loglik_linear(h, W, b, lib, r, csr)
    ll.sum().backward()
    ref = reference.nb_softmax_loglik_linear(h.detach().requires_grad_(), W, b, lib, r.detach(), csr)
    assert torch.allclose(ll.detach(), ref.detach(), rtol=1e-5)
    assert h.grad is not None and r.grad is not None and W.grad is None and b.grad is None


def test_empty_batch(native_ext):
    h = torch.randn(0, 4, requires_grad=True)
    W = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    r = torch.randn(5, requires_grad=True)
    csr = (torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    ll = native.nb_softmax_loglik_linear(h, W, b, torch.zeros(0), r, csr)
    assert ll.shape == (0,)
    ll.sum().backward()
    assert h.grad.shape == (0, 4) and (W.grad == 0).all() and (b.grad == 0).all()
    assert (r.grad == 0).all()


def test_functional_dispatch_matches(gen, native_ext):
    """``functional`` picks the fused op for native and composes for torch; same numbers."""
    csr, x = _counts(gen, 33, 407, 0.15)
    leaves = _leaves(x, 21, gen)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    g = torch.randn(33, generator=gen, dtype=torch.float64)
    outs = {}
    for impl in ("native", "torch"):
        ls = [t.detach().clone().requires_grad_() for t in l64]
        ll = functional.nb_softmax_loglik_linear(*ls, csr, impl=impl)
        outs[impl] = [ll.detach(), *torch.autograd.grad(ll, ls, g)]
    for a, t, name in zip(outs["native"], outs["torch"], NAMES):
        assert_accurate(OP, a, t, name)


def test_bad_shapes_and_mixed_dtypes(native_ext):
    csr = (torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="weight"):
        native.nb_softmax_loglik_linear(torch.randn(1, 3), torch.randn(2, 4), None,
                                        torch.zeros(1), torch.zeros(2), csr)
    # mixed dtypes take the composition: torch's linear refuses them, as for the reference
    args = (torch.randn(1, 3), torch.randn(2, 3).double(), None, torch.zeros(1), torch.zeros(2),
            csr)
    with pytest.raises(RuntimeError, match="dtype"):
        reference.nb_softmax_loglik_linear(*args)
    with pytest.raises(RuntimeError, match="dtype"):
        native.nb_softmax_loglik_linear(*args)


def test_composition_under_autocast(gen, native_ext):
    """Under bf16 autocast the layer runs in bf16 and the likelihood in float32: the reference's
    composition with the native likelihood."""
    csr, x = _counts(gen, 11, 57, 0.2)
    h, W, b, lib, r = _leaves(x, 9, gen)
    csr = csr.to(dtype=torch.float32)
    outs = {}
    for impl, fn in (("native", native.nb_softmax_loglik_linear),
                     ("torch", reference.nb_softmax_loglik_linear)):
        leaves = [t.detach().clone().requires_grad_() for t in (h, W, b, r)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ll = fn(leaves[0], leaves[1], leaves[2], lib, leaves[3], csr)
            logits = torch.nn.functional.linear(h, W, b)
        outs[impl] = [ll.detach(), *torch.autograd.grad(ll.sum(), leaves)]
    assert logits.dtype == torch.bfloat16
    truth = reference.nb_softmax_loglik(logits.double(), lib.double(), r.double(), csr)
    scale = nb_term_magnitudes(logits, lib, r, csr, torch.ones(11))[0]
    assert_accurate("nb_softmax_loglik", outs["native"][0], truth, "loglik", scale=scale)
    for a, t in zip(outs["native"][1:], outs["torch"][1:]):
        # the backward GEMMs run in bf16 on float32 logit gradients that differ in their last
        # bits: a bf16 rounding (2^-8 relative) may flip, no more
        assert a.dtype == t.dtype
        torch.testing.assert_close(a, t, rtol=0, atol=2.0**-7 * t.abs().max().item())


def test_scratch_pool_reuses_and_bounds():
    pool = ScratchPool(per_key=2, max_keys=2)
    a = pool.take((3, 4), torch.float32, "cpu")
    pool.give(a)
    assert pool.take((3, 4), torch.float32, "cpu") is a
    pool.give(a)
    pool.give(a)  # the same tensor twice is kept once
    assert pool.nbytes() == a.numel() * 4
    for shape in ((1, 2), (2, 2), (5, 5)):
        pool.give(torch.empty(shape))
    assert pool.nbytes() == (4 + 25) * 4  # least recently used shapes dropped
    pool.clear()
    assert pool.nbytes() == 0
