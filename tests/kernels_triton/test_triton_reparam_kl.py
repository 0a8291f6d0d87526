"""Fused reparameterisation + KL (Triton) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import seed_of
from scvi_fast import reference
from scvi_fast.reference._accuracy import assert_accurate

SHAPES = [(8, 10), (3, 37), (1, 1), (5, 70)]


def _inputs(gen, shape, dtype, device):
    q_m = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2
    raw = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q_m, raw, noise)]


def _run(fn, inputs, gz, gk, needs):
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, needs)]
    z, kl = fn(*leaves)
    outs = [z, kl]
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad((z * gz).sum() + (kl * gk).sum(), wrt)
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(tk, device, poison_empty, shape, dtype):
    gen = torch.Generator().manual_seed(seed_of(shape, dtype))
    inputs = _inputs(gen, shape, dtype, device)
    gz = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)
    gk = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(device, dtype)
    needs = (True, True, True)
    got = _run(tk.reparam_kl, inputs, gz, gk, needs)
    names = ["z", "kl", "dq_m", "dq_v_raw", "deps"]
    inputs64 = [t.double() for t in inputs]
    truth = _run(reference.reparam_kl, inputs64, gz.double(), gk.double(), needs)
    # float32: judged against torch's own float32 error on the same inputs
    low = (_run(reference.reparam_kl, inputs, gz, gk, needs) if dtype == torch.float32
           else [None] * len(names))
    for g, t, r, n in zip(got, truth, low, names):
        assert_accurate("reparam_kl", g, t, n, low=r)


def test_partial_gradients_and_batch_dims(tk, device):
    gen = torch.Generator().manual_seed(1)
    q_m, raw, noise = _inputs(gen, (2, 3, 5), torch.float64, device)
    q_m.requires_grad_(True)  # raw and noise need no gradient
    z, kl = tk.reparam_kl(q_m, raw, noise)
    z_ref, kl_ref = reference.reparam_kl(q_m, raw, noise)
    assert z.shape == (2, 3, 5) and kl.shape == (2, 3)
    assert_accurate("reparam_kl", z, z_ref, "z")
    gk = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(device)
    (g,) = torch.autograd.grad((kl * gk).sum(), q_m)  # z unused: its gradient is zero
    (g_ref,) = torch.autograd.grad((kl_ref * gk).sum(), q_m)
    assert_accurate("reparam_kl", g, g_ref, "dq_m")


def test_rejects_mismatched_shapes(tk, device):
    a = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match="one shape"):
        tk.reparam_kl(a, a, torch.zeros(2, 4, device=device))


def test_other_var_eps(tk, device):
    """``var_eps`` reaches the kernels (part of the back-end contract)."""
    gen = torch.Generator().manual_seed(2)
    inputs = _inputs(gen, (6, 9), torch.float64, device)
    gz = torch.randn(6, 9, generator=gen, dtype=torch.float64).to(device)
    gk = torch.randn(6, generator=gen, dtype=torch.float64).to(device)
    needs = (True, True, True)
    got = _run(lambda m, r, e: tk.reparam_kl(m, r, e, 0.25), inputs, gz, gk, needs)
    want = _run(lambda m, r, e: reference.reparam_kl(m, r, e, 0.25), inputs, gz, gk, needs)
    for g, w, n in zip(got, want, ["z", "kl", "dq_m", "dq_v_raw", "deps"]):
        assert_accurate("reparam_kl", g, w, n)
