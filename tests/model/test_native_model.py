"""The VAE with ``impl="native"`` (fused output layer + likelihood in ``forward``) reproduces
``impl="torch"``: loss and every parameter gradient, on the scvi-tools fixture models, with
a non-uniform per-cell weight on top of the mean loss (the training case is uniform).
Training-mode BatchNorm; dropout off, since the two back-ends draw different masks (the
native mask is tested in tests/kernels/test_native_dropout.py)."""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional as F_ops
from tests.helpers import csr_batch, module_from_fixture
from tests.kernels.conftest import native_ext  # noqa: F401  (fixture)


def _loss_and_grads(name, impl, dtype, n_cells=64, extra_weight=True):
    vae, arrays, _, _ = module_from_fixture(name, impl=impl, dtype=dtype)
    vae.train()
    for block in vae.encoder.blocks:  # the back-ends draw different dropout masks
        block.dropout_rate = 0.0
    x = csr_batch(arrays["x"][:n_cells], arrays["batch_index"][:n_cells], dtype=dtype)
    eps = torch.from_numpy(arrays["eps"][:n_cells]).to(dtype)
    _, _, out = vae(x, kl_weight=0.7, eps_noise=eps)
    total = out.loss
    if extra_weight:
        n = out.n_obs
        w = torch.linspace(0.5, 1.5, n, dtype=dtype)
        total = total + (w * out.reconstruction_loss).sum() / n
    names = [n for n, p in vae.named_parameters() if p.requires_grad]
    params = [p for _, p in vae.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    result = {"loss": total.detach().reshape(1), "rec": out.reconstruction_loss.detach(),
              "kl": out.kl_local.detach()}
    result.update({n: g for n, g in zip(names, grads) if g is not None})
    return result


def _err(a, truth, floor):
    """Norm-wise error, relative to ``max(max|truth|, floor)``.

    The floor matters for the biases right before a BatchNorm, whose exact gradient is 0
    (both back-ends return rounding noise of ~1e-17 there).
    """
    diff = (a.double() - truth.double()).abs().max().item()
    return diff / max(truth.double().abs().max().item(), floor)


@pytest.mark.parametrize("name", ["default", "deep", "nobatch"])
@pytest.mark.parametrize("extra_weight", [False, True])
def test_native_model_matches_torch(name, extra_weight, native_ext):
    want64 = _loss_and_grads(name, "torch", torch.float64, extra_weight=extra_weight)
    got64 = _loss_and_grads(name, "native", torch.float64, extra_weight=extra_weight)
    assert got64.keys() == want64.keys()
    floor = 1e-6 * max(t.abs().max().item() for t in want64.values())
    for k in want64:
        # the kernels' float64 bounds (tests/kernels/tolerances.py), composed through the net
        assert _err(got64[k], want64[k], floor) <= 1e-9, k
    want32 = _loss_and_grads(name, "torch", torch.float32, extra_weight=extra_weight)
    got32 = _loss_and_grads(name, "native", torch.float32, extra_weight=extra_weight)
    for k in want64:
        # within 4x torch's own float32 error, plus a few float32 ulps
        bound = 4 * _err(want32[k], want64[k], floor) + 1e-6
        assert _err(got32[k], want64[k], floor) <= bound, k


def test_forward_equals_generative_then_loss(native_ext):
    """``forward`` and ``loss(x, inference, generative)`` are one route: the same numbers, and the
    fused output layer + likelihood equals the likelihood of ``generative(logits=True)``'s
    logits (the plain op)."""
    vae, arrays, _, _ = module_from_fixture("default", impl="native", dtype=torch.float64)
    x = csr_batch(arrays["x"], arrays["batch_index"], dtype=torch.float64)
    eps = torch.from_numpy(arrays["eps"]).double()
    vae.eval()
    with torch.no_grad():
        inf, gen, fused = vae(x, kl_weight=0.3, eps_noise=eps)
        gen2 = vae.generative(inf["z"], x.batch)
        plain = vae.loss(x, inf, gen2, kl_weight=0.3)
    assert set(gen) == set(gen2) == {"hidden", "px_r"}
    torch.testing.assert_close(gen["hidden"], gen2["hidden"], rtol=0, atol=0)
    torch.testing.assert_close(fused.reconstruction_loss, plain.reconstruction_loss,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=0)
    with torch.no_grad():
        logits = vae.generative(inf["z"], x.batch, logits=True)["logits"]
    unfused = -F_ops.nb_softmax_loglik(logits, inf["library"], vae.px_r, x, impl="native")
    torch.testing.assert_close(fused.reconstruction_loss, unfused, rtol=1e-12, atol=0)
