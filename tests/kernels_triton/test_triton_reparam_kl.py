"""Fused reparameterisation + KL (Triton) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import assert_close64, assert_within_torch32, seed_of
from scvi_fast import reference

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
    if dtype == torch.float64:
        want = _run(reference.reparam_kl, inputs, gz, gk, needs)
        for g, w, n in zip(got, want, names):
            assert_close64(g, w, "reparam_kl", n)
    else:
        inputs64 = [t.double() for t in inputs]
        truth = _run(reference.reparam_kl, inputs64, gz.double(), gk.double(), needs)
        torch32 = _run(reference.reparam_kl, inputs, gz, gk, needs)
        for g, t32, t64, n in zip(got, torch32, truth, names):
            assert_within_torch32(g, t32, t64, "reparam_kl", n)


def test_partial_gradients_and_batch_dims(tk, device):
    gen = torch.Generator().manual_seed(1)
    q_m, raw, noise = _inputs(gen, (2, 3, 5), torch.float64, device)
    q_m.requires_grad_(True)  # raw and noise need no gradient
    z, kl = tk.reparam_kl(q_m, raw, noise)
    z_ref, kl_ref = reference.reparam_kl(q_m, raw, noise)
    assert z.shape == (2, 3, 5) and kl.shape == (2, 3)
    assert_close64(z, z_ref, "reparam_kl", "z")
    gk = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(device)
    (g,) = torch.autograd.grad((kl * gk).sum(), q_m)  # z unused: its gradient is zero
    (g_ref,) = torch.autograd.grad((kl_ref * gk).sum(), q_m)
    assert_close64(g, g_ref, "reparam_kl", "dq_m")


def test_rejects_mismatched_shapes(tk, device):
    a = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match="one shape"):
        tk.reparam_kl(a, a, torch.zeros(2, 4, device=device))
