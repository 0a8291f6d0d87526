"""The VAE with ``impl="triton"`` reproduces ``impl="torch"`` (loss and every parameter
gradient) on the scvi-tools fixture models, at 8 cells."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import TOL, assert_within_torch32
from tests.helpers import csr_batch, module_from_fixture

N_CELLS = 8


def _loss_and_grads(name, impl, dtype, device):
    vae, arrays, _, _ = module_from_fixture(name, impl=impl, dtype=dtype)
    vae = vae.to(device)
    x = csr_batch(arrays["x"][:N_CELLS], arrays["batch_index"][:N_CELLS], dtype=dtype)
    for k in ("indptr", "indices", "values", "library", "batch", "labels"):
        setattr(x, k, getattr(x, k).to(device))
    eps = torch.from_numpy(arrays["eps"][:N_CELLS]).to(device, dtype)
    _, _, out = vae(x, kl_weight=0.7, eps_noise=eps)
    # a non-uniform weight per cell on top of the mean, so that every row's gradient differs
    w = torch.linspace(0.5, 1.5, N_CELLS, dtype=dtype, device=device)
    total = out.loss + (w * out.reconstruction_loss).sum() / N_CELLS
    names = [n for n, p in vae.named_parameters() if p.requires_grad]
    params = [p for _, p in vae.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    result = {"loss": total.detach().reshape(1), "rec": out.reconstruction_loss.detach()}
    for n, g in zip(names, grads):
        if g is not None:
            result[n] = g
    return result


# one precision per fixture keeps the interpreter time down (default: G=1287, one layer of
# 128; deep: G=128, two layers of 512, Z=50)
@pytest.mark.parametrize("name, dtype", [("default", torch.float64), ("deep", torch.float32)])
def test_model_triton_matches_torch(device, name, dtype):
    want64 = _loss_and_grads(name, "torch", torch.float64, device)
    got = _loss_and_grads(name, "triton", dtype, device)
    assert got.keys() == want64.keys()
    if dtype == torch.float64:
        atol, rtol = TOL[("model", torch.float64)]
        for k in want64:
            scale = max(want64[k].abs().max().item(), 1.0)
            torch.testing.assert_close(
                got[k], want64[k], atol=atol * scale, rtol=rtol, msg=lambda m: f"{k}: {m}"
            )
    else:
        want32 = _loss_and_grads(name, "torch", torch.float32, device)
        for k in want64:
            assert_within_torch32(got[k], want32[k], want64[k], "model", k)
