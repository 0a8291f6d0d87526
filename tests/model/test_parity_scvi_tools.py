"""scvi_fast reproduces scvi-tools' outputs on stored fixtures (weights + real counts).

Fixtures: ``tests/fixtures/scvi_{default,deep,nobatch}.npz``, made by
``tests/fixtures/make_scvi_fixtures.py`` with scvi-tools 1.4.2 (not needed here).

Tolerance: scvi-tools' float32 outputs and ours are two float32 evaluations of
the same function with different operation orders (a sparse first layer, a
gathered instead of concatenated batch term). We compare in float64 against
scvi-tools' float64 outputs to 1e-9 relative (the two are the same math), and
in float32 require our error against the float64 truth to stay within 4x
scvi-tools' own float32 error plus a few float32 ulps (rtol 2e-6 of the
magnitude), i.e. equal "to float32 rounding".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import csr_batch, module_from_fixture

MODELS = ["default", "deep", "nobatch"]


def _outputs(vae, arrays, dtype):
    x = csr_batch(arrays["x"], arrays["batch_index"], dtype=dtype)
    eps = torch.from_numpy(arrays["eps"]).to(dtype)
    with torch.no_grad():
        inf = vae.inference(x, eps_noise=eps)
        gen = vae.generative(inf["z"], x.batch, logits=True)
        out = vae.loss(x, inf, gen)
        scale = torch.softmax(gen["logits"], -1)
        theta = torch.exp(gen["px_r"])
    return {
        "q_m": inf["q_m"], "q_v": inf["q_v"], "z": inf["z"],
        "library": inf["library"].reshape(-1, 1),
        "px_scale": scale, "px_rate": torch.exp(inf["library"]).reshape(-1, 1) * scale,
        "px_r": theta,
        "reconst_loss": out.reconstruction_loss, "kl": out.kl_local,
    }


@pytest.mark.parametrize("name", MODELS)
def test_float64_matches_scvi_tools_float64(name):
    vae, arrays, _, _ = module_from_fixture(name, dtype=torch.float64)
    ours = _outputs(vae, arrays, torch.float64)
    for key, val in ours.items():
        ref = arrays[f"{key}_f64"]
        np.testing.assert_allclose(val.numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max(), err_msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_float32_matches_scvi_tools_to_rounding(name):
    vae, arrays, _, _ = module_from_fixture(name, dtype=torch.float32)
    ours = _outputs(vae, arrays, torch.float32)
    for key, val in ours.items():
        truth = arrays[f"{key}_f64"]
        theirs_err = np.abs(arrays[key].astype(np.float64) - truth).max()
        our_err = np.abs(val.numpy().astype(np.float64) - truth).max()
        bound = 4 * theirs_err + 2e-6 * np.abs(truth).max()
        assert our_err <= bound, f"{name}/{key}: error {our_err:.3g} > {bound:.3g} (scvi-tools' own: {theirs_err:.3g})"
        # and directly against scvi-tools' float32 numbers
        np.testing.assert_allclose(val.numpy(), arrays[key], rtol=2e-5, atol=2e-6 * np.abs(truth).max(), err_msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_latent_mean_matches_scvi_tools(name):
    vae, arrays, _, _ = module_from_fixture(name)
    x = csr_batch(arrays["x"], arrays["batch_index"])
    with torch.no_grad():
        q_m, _ = vae.posterior(x, need_var=False)
    np.testing.assert_allclose(q_m.numpy(), arrays["latent_mean"], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", MODELS)
def test_elbo_and_reconstruction_conventions(name):
    """get_elbo / get_reconstruction_error signs and averaging, with scvi-tools' sampled z."""
    vae, arrays, _, _ = module_from_fixture(name, dtype=torch.float64)
    x = csr_batch(arrays["x"], arrays["batch_index"], dtype=torch.float64)
    with torch.no_grad():
        inf = vae.inference(x)
        for zkey, ref_key, sign in (("elbo_per_cell_z", "elbo_per_cell", -1.0),
                                    ("reconstruction_error_per_cell_z", "reconstruction_error_per_cell", 1.0)):
            z = torch.from_numpy(arrays[zkey]).double()
            inf2 = dict(inf, z=z)
            q_m, q_v = inf["q_m"], inf["q_v"]
            inf2["kl"] = 0.5 * (q_v + q_m**2 - 1 - torch.log(q_v)).sum(-1)
            gen = vae.generative(z, x.batch)
            out = vae.loss(x, inf2, gen)
            val = (out.reconstruction_loss + out.kl_local) if sign < 0 else out.reconstruction_loss
            np.testing.assert_allclose(sign * val.numpy(), arrays[ref_key], rtol=2e-5)
