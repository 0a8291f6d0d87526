"""The CSR contract on the CPU back-ends (reference and native), and the dense first-layer method.

Contract: only the entries ``indptr[0] .. indptr[-1]`` are read; ``indices`` / ``values`` may be
a longer, padded capacity whose tail (NaN values, negative or out-of-range gene ids) changes
nothing, in any output or gradient; int32 and int64 ``indptr`` / ``indices`` are both taken.
"""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional, reference
from scvi_fast.module import SparseInputLinear
from scvi_fast.reference._accuracy import assert_accurate
from scvi_fast.reference._random import random_csr


def _grads(out, leaves, upstream):
    return list(torch.autograd.grad(out, leaves, upstream))


def _sparse_linear_all(fn, csr, W, b, cov, W_cov, dy, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (W, b, W_cov)]
    y = fn(*csr, leaves[0], leaves[1], cov, leaves[2], "log1p", **kw)
    return [y.detach(), *_grads(y, leaves, dy)]


def _nb_all(fn, csr, logits, lib, px_r, w, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (logits, lib, px_r)]
    ll = fn(*leaves, csr, **kw)
    return [ll.detach(), *_grads(ll, leaves, w)]


def _assert_equal(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i)
        assert torch.equal(g, w), f"{what}: output {i} differs by {(g - w).abs().max().item()}"


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("method", ["gather", "dense"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_linear_padded_tail_changes_nothing(impl, method, index_dtype, gen):
    csr = random_csr(gen, 9, 40, 0.3, max_count=5000, empty_rows=(0, 4))
    W = torch.randn(40, 6, generator=gen)
    b, W_cov = torch.randn(6, generator=gen), torch.randn(3, 6, generator=gen)
    cov = torch.randint(0, 3, (9,), generator=gen)
    dy = torch.randn(9, 6, generator=gen)

    def run(c):
        return _sparse_linear_all(functional.sparse_linear, c, W, b, cov, W_cov, dy, impl=impl,
                                  method=method)

    want = run(csr)
    _assert_equal(run(csr.padded(13, 40).to(index_dtype=index_dtype)), want, f"{impl}/{method}")


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_nb_padded_tail_changes_nothing(impl, index_dtype, gen):
    csr = random_csr(gen, 7, 50, 0.3, max_count=5000, empty_rows=(2,))
    logits = torch.randn(7, 50, generator=gen)
    lib = torch.log(csr.dense(50).sum(1).float() + 1)
    px_r = torch.randn(50, generator=gen)
    w = torch.randn(7, generator=gen)
    want = _nb_all(functional.nb_softmax_loglik, csr, logits, lib, px_r, w, impl=impl)
    got = _nb_all(functional.nb_softmax_loglik, csr.padded(11, 50).to(index_dtype=index_dtype),
                  logits, lib, px_r, w, impl=impl)
    _assert_equal(got, want, impl)


@pytest.mark.parametrize("impl", ["torch", "native"])
def test_nb_linear_padded_tail_changes_nothing(impl, gen):
    csr = random_csr(gen, 6, 30, 0.3, max_count=5000)
    h, W, bias = torch.randn(6, 5, generator=gen), torch.randn(30, 5, generator=gen), None
    lib = torch.log(csr.dense(30).sum(1).float() + 1)
    px_r = torch.randn(30, generator=gen)
    w = torch.randn(6, generator=gen)

    def run(c):
        leaves = [t.clone().requires_grad_() for t in (h, W, px_r)]
        ll = functional.nb_softmax_loglik_linear(leaves[0], leaves[1], bias, lib, leaves[2], c,
                                                 impl=impl)
        return [ll.detach(), *_grads(ll, leaves, w)]

    _assert_equal(run(csr.padded(9, 30).to(index_dtype=torch.int32)), run(csr), impl)


def test_native_rejects_indptr_past_capacity(gen, native_ext):
    csr = list(random_csr(gen, 3, 10, 0.5))
    csr[0] = csr[0].clone()
    csr[0][-1] = csr[1].numel() + 1
    with pytest.raises(RuntimeError, match="exceeds the length"):
        functional.nb_softmax_loglik(torch.zeros(3, 10), torch.zeros(3), torch.zeros(10), csr,
                                     impl="native")


def test_csr_helpers_ignore_the_tail():
    indptr = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    indices = torch.tensor([1, 0, 2, -5, 99], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 3.0, float("nan"), 4.0])
    assert reference.csr_row_ids(indptr, 5).tolist() == [0, 0, 2, 3, 3]
    assert reference.csr_valid(indptr, 5).tolist() == [True] * 3 + [False] * 2
    dense = reference.csr_to_dense(indptr, indices, values, 3)
    assert dense.tolist() == [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]


# ----------------------------------------------------------------------------- method="dense"


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("transform", ["log1p", "identity"])
def test_dense_method_matches_float64_reference(impl, transform, gen):
    B, G, H, K = 6, 23, 7, 3
    # unsorted rows with repeated genes, an empty row, int32 arrays
    csr = random_csr(gen, B, G, 0.3, max_count=50, index_dtype=torch.int32, empty_rows=(1,),
                     shuffled=0.5, duplicates=0.5)
    W = torch.randn(G, H, generator=gen)
    b, W_cov = torch.randn(H, generator=gen), torch.randn(K, H, generator=gen)
    cov = torch.randint(0, K, (B,), generator=gen)
    dy = torch.randn(B, H, generator=gen)
    names = ["y", "dW", "db", "dW_cov"]

    def run(method, dtype, fn=functional.sparse_linear, **kw):
        c = (csr[0], csr[1], csr[2].to(dtype))
        leaves = [t.to(dtype).requires_grad_() for t in (W, b, W_cov)]
        y = fn(*c, leaves[0], leaves[1], cov, leaves[2], transform, method=method, **kw)
        return [y.detach(), *_grads(y, leaves, dy.to(dtype))]

    truth = run("gather", torch.float64, reference.sparse_linear)
    for a, t, n in zip(run("dense", torch.float64, impl=impl), truth, names):
        assert_accurate("sparse_linear", a, t, n)
    ref32 = run("gather", torch.float32, reference.sparse_linear)
    for a, r, t, n in zip(run("dense", torch.float32, impl=impl), ref32, truth, names):
        assert_accurate("sparse_linear", a, t, n, low=r)


def test_method_resolution_and_layer_attribute(gen):
    assert reference.resolve_method("auto", "cpu") == "gather"
    assert reference.resolve_method("auto", "cuda") == "dense"
    with pytest.raises(ValueError, match="method"):
        reference.resolve_method("sparse", "cpu")
    layer = SparseInputLinear(20, 4)
    assert layer.method == "auto"
    indptr, indices, values = random_csr(gen, 5, 20, 0.4)
    batch = type("Batch", (), dict(indptr=indptr, indices=indices, values=values))()
    y_auto = layer(batch)
    layer.method = "dense"
    torch.testing.assert_close(layer(batch), y_auto, rtol=1e-5, atol=1e-6)


def test_dense_reference_under_bf16_autocast_runs_in_bf16(gen):
    csr = random_csr(gen, 8, 30, 0.3)
    W = torch.randn(30, 5, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = reference.sparse_linear(*csr, W, None, method="dense")
    assert y.dtype == torch.bfloat16
    truth = reference.sparse_linear(*csr, W.detach().double(), None, method="gather")
    # bf16 inputs (8 bits of mantissa) summed over <= 30 terms: a few 2^-8 of the largest term
    fx = torch.log1p(reference.csr_to_dense(*csr, 30).double())
    scale = fx.abs() @ W.detach().double().abs()
    assert ((y.double() - truth).abs() <= 3 * 2.0**-8 * scale + 1e-6).all()
    y.float().sum().backward()
    assert W.grad is not None and W.grad.dtype == torch.float32
