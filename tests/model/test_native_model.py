"""The VAE with ``impl="native"`` (fused output layer + likelihood in ``forward``) reproduces
``impl="torch"``: loss and every parameter gradient, on the scvi-tools fixture models, with
a non-uniform per-cell weight on top of the mean loss (the training case is uniform).
Training-mode BatchNorm; dropout off, since the two back-ends draw different masks (the
native mask is tested in tests/kernels/test_native_dropout.py)."""

from __future__ import annotations

import pytest
import torch

from scvi_fast import functional as F_ops
from tests.helpers import assert_model_accurate, csr_batch, model_loss_and_grads, module_from_fixture
from tests.kernels.conftest import native_ext  # noqa: F401  (fixture)


@pytest.mark.parametrize("name", ["default", "deep", "nobatch"])
@pytest.mark.parametrize("extra_weight", [False, True])
def test_native_model_matches_torch(name, extra_weight, native_ext):
    def run(impl, dtype):
        return model_loss_and_grads(name, impl, dtype, 64, train=True, extra_weight=extra_weight)

    want64 = run("torch", torch.float64)
    assert_model_accurate(run("native", torch.float64), want64)
    assert_model_accurate(run("native", torch.float32), want64, run("torch", torch.float32))


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
