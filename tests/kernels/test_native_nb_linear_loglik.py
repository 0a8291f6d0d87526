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
from tests.kernels.conftest import csr_of, random_counts
from tests.kernels.tolerances import assert_f32_close, assert_f64_close

OP = "nb_softmax_loglik_linear"
NAMES = ("loglik", "d_h", "d_weight", "d_bias", "d_log_library", "d_px_r")


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


def _check(x, H, gen, uniform, bias=True, index_dtype=torch.int64, twice=False):
    B, G = x.shape
    l32 = _leaves(x, H, gen, bias)
    l64 = [t.detach().double().requires_grad_() if t is not None else None for t in l32]
    g32 = torch.full((B,), -0.37) if uniform else torch.randn(B, generator=gen)
    csr64 = csr_of(x, torch.float64, index_dtype)
    csr32 = (csr64[0], csr64[1], csr64[2].float())

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
                assert_f64_close(OP, a, t, name)

    ref32, _ = _run(reference.nb_softmax_loglik_linear, l32, csr32, g32)
    _poison_pool(B, G, torch.float32)
    got32, _ = _run(native.nb_softmax_loglik_linear, l32, csr32, g32)
    for a, r, t, name in zip(got32, ref32, truth, NAMES):
        if t is not None:
            assert_f32_close(OP, a, r, t, name)


@pytest.mark.parametrize("uniform", [True, False])
def test_census_shape(uniform, gen, native_ext):
    _check(random_counts(256, 8000, 0.1, gen, max_count=300.0), 512, gen, uniform)


@pytest.mark.parametrize("B,G,H,density", [(37, 1999, 23, 0.1), (6, 4, 3, 0.6), (1, 1, 1, 1.0)])
@pytest.mark.parametrize("uniform", [False, True])
def test_odd_shapes(B, G, H, density, uniform, gen, isa):
    x = random_counts(B, G, density, gen, empty_rows=(3,), empty_cols=(2,))
    _check(x, H, gen, uniform, index_dtype=torch.int32 if uniform else torch.int64)


@pytest.mark.parametrize("uniform", [False, True])
def test_without_bias(uniform, gen, native_ext):
    _check(random_counts(29, 301, 0.2, gen), 17, gen, uniform, bias=False)


@pytest.mark.parametrize("uniform", [False, True])
def test_backward_twice_through_retained_graph(uniform, gen, native_ext):
    _check(random_counts(29, 301, 0.2, gen), 17, gen, uniform, twice=True)


def test_only_some_gradients(gen, native_ext):
    """Frozen weights (e.g. query training of a reference model): only what is asked for."""
    x = random_counts(19, 211, 0.2, gen)
    h, W, b, lib, r = _leaves(x, 13, gen)
    W.requires_grad_(False)
    b.requires_grad_(False)
    csr = csr_of(x, torch.float32)
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
    x = random_counts(33, 407, 0.15, gen)
    leaves = _leaves(x, 21, gen)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    csr = csr_of(x, torch.float64)
    g = torch.randn(33, generator=gen, dtype=torch.float64)
    outs = {}
    for impl in ("native", "torch"):
        ls = [t.detach().clone().requires_grad_() for t in l64]
        ll = functional.nb_softmax_loglik_linear(*ls, csr, impl=impl)
        outs[impl] = [ll.detach(), *torch.autograd.grad(ll, ls, g)]
    for a, t, name in zip(outs["native"], outs["torch"], NAMES):
        assert_f64_close(OP, a, t, name)


def test_bad_arguments(native_ext):
    csr = (torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="weight"):
        native.nb_softmax_loglik_linear(torch.randn(1, 3), torch.randn(2, 4), None,
                                        torch.zeros(1), torch.zeros(2), csr)
    with pytest.raises(TypeError, match="dtype"):
        native.nb_softmax_loglik_linear(torch.randn(1, 3), torch.randn(2, 3).double(), None,
                                        torch.zeros(1), torch.zeros(2), csr)


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
