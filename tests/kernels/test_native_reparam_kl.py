"""Native ``reparam_kl`` against the pure-PyTorch reference (value and every gradient)."""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional, reference
from scvi_fast.kernels import native
from scvi_fast.reference._accuracy import assert_accurate
from tests.kernels.conftest import poison_heap

OP = "reparam_kl"
NAMES = ("z", "kl", "d_q_m", "d_q_v_raw")


def _run(fn, leaves, noise, dz, dkl):
    z, kl = fn(*leaves, noise)
    grads = torch.autograd.grad((z, kl), leaves, (dz, dkl))
    return [z.detach(), kl.detach(), *grads]


@pytest.mark.parametrize("shape", [(1024, 50), (37, 13), (1, 1), (0, 10), (4, 0), (3, 5, 7)])
def test_matches_reference(shape, gen, isa):
    q_m = torch.randn(shape, generator=gen) * 2
    q_v_raw = torch.randn(shape, generator=gen) * 3  # variances from ~1e-4 to ~1e4
    noise = torch.randn(shape, generator=gen)
    dz = torch.randn(shape, generator=gen)
    dkl = torch.randn(shape[:-1], generator=gen)
    l32 = [q_m.requires_grad_(), q_v_raw.requires_grad_()]
    l64 = [t.detach().double().requires_grad_() for t in l32]

    truth = _run(reference.reparam_kl, l64, noise.double(), dz.double(), dkl.double())
    poison_heap(shape, shape[:-1], dtype=torch.float64)
    got64 = _run(native.reparam_kl, l64, noise.double(), dz.double(), dkl.double())
    for a, t, name in zip(got64, truth, NAMES):
        assert_accurate(OP, a, t, name)

    ref32 = _run(reference.reparam_kl, l32, noise, dz, dkl)
    poison_heap(shape, shape[:-1])
    got32 = _run(native.reparam_kl, l32, noise, dz, dkl)
    for a, r, t, name in zip(got32, ref32, truth, NAMES):
        assert_accurate(OP, a, t, name, low=r)


@pytest.mark.parametrize("use", ["z", "kl"])
def test_one_output_used(use, gen, native_ext):
    """Gradients through only z or only the KL (autograd passes no gradient for the other)."""
    q_m = torch.randn(20, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    q_v_raw = torch.randn(20, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(20, 6, generator=gen, dtype=torch.float64)

    def loss(fn):
        z, kl = fn(q_m, q_v_raw, noise)
        return (z * w).sum() if use == "z" else (kl * w[:, 0]).sum()

    got = torch.autograd.grad(loss(native.reparam_kl), (q_m, q_v_raw))
    want = torch.autograd.grad(loss(reference.reparam_kl), (q_m, q_v_raw))
    for a, t, name in zip(got, want, NAMES[2:]):
        assert_accurate(OP, a, t, name)


def test_q_m_only_requires_grad(gen, native_ext):
    q_m = torch.randn(8, 4, generator=gen, requires_grad=True)
    q_v_raw = torch.randn(8, 4, generator=gen)
    z, kl = native.reparam_kl(q_m, q_v_raw, torch.randn(8, 4, generator=gen))
    (z.sum() + kl.sum()).backward()
    assert q_m.grad is not None and q_v_raw.grad is None


def test_functional_dispatch(gen):
    args = [torch.randn(9, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    got = functional.reparam_kl(*args, impl="native")
    want = functional.reparam_kl(*args, impl="torch")
    for a, t in zip(got, want):
        assert_accurate(OP, a, t, "functional")


def test_rejects_mismatched_shapes(gen, native_ext):
    with pytest.raises(RuntimeError, match="same shape"):
        native.load().reparam_kl_forward(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, 4), 1e-4)


def test_reference_gradcheck(gen):
    q_m = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    q_v_raw = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, v: reference.reparam_kl(m, v, noise), (q_m, q_v_raw))
