"""scvi_fast reproduces scvi-tools' models with extra covariates on stored fixtures.

Fixtures: ``tests/fixtures/scvi_cov_<name>.npz`` (``make_scvi_covariate_fixtures.py``, scvi-tools
1.4.2): batch + two categorical covariates (8 and 3 categories) + two continuous ones, with
``encode_covariates`` and ``deeply_inject_covariates`` each True and False, ``sf`` with a
``size_factor_key``, and ``zinb_lenc`` with ZINB, ``dispersion="gene-batch"`` and the library
encoder (which reads the encoded covariates too; its noise fixed as ``eps_library``). Tolerance: float64 against scvi-tools' float64 outputs to 1e-9 relative
(the same math in another operation order: a sparse first layer, gathered one-hot columns
instead of a concatenated GEMM), as ``test_parity_scvi_tools.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import csr_batch, load_fixture

CONFIGS = ["enc_deep", "enc_shallow", "dec_deep", "dec_shallow", "sf", "zinb_lenc"]


def covariate_vae(name: str, impl: str = "torch", dtype=torch.float64):
    """The scvi_fast VAE of fixture ``scvi_cov_<name>`` with scvi-tools' weights, eval mode."""
    from scvi_fast.compat import scvi_tools_state_to_module
    from scvi_fast.module import VAE

    arrays, cfg = load_fixture(f"cov_{name}")
    state = {k[len("state/"):]: torch.from_numpy(v) for k, v in arrays.items()
             if k.startswith("state/")}
    covs = dict(
        n_cats_per_cov=[len(cfg["categorical_covariate_categories"][k])
                        for k in cfg["categorical_covariate_keys"]],
        n_continuous_cov=len(cfg["continuous_covariate_keys"]),
        encode_covariates=cfg["encode_covariates"],
        deeply_inject_covariates=cfg["deeply_inject_covariates"],
    )
    # the NB fixtures predate the recorded options: NB, per-gene dispersion, observed library
    options = {k: cfg.get(k, d) for k, d in (("gene_likelihood", "nb"), ("dispersion", "gene"),
                                            ("use_observed_lib_size", True))}
    mod_state, _, arch = scvi_tools_state_to_module(state, **options, covariates=covs)
    vae = VAE(arch["n_input"], n_batch=arch["n_batch"], n_hidden=arch["n_hidden"],
              n_latent=arch["n_latent"], n_layers=arch["n_layers"],
              dropout_rate=cfg["dropout_rate"], impl=impl,
              library_log_means=mod_state.get("library_log_means"),
              library_log_vars=mod_state.get("library_log_vars"),
              use_size_factor_key=cfg["size_factor_key"] is not None, **options, **covs)
    vae.load_state_dict(mod_state)
    return vae.to(dtype).eval(), arrays, cfg


def covariate_batch(arrays, dtype=torch.float64):
    x = csr_batch(arrays["x"], arrays["batch_index"], dtype=dtype)
    x.cat_covs = torch.from_numpy(arrays["cat_covs"])
    x.cont_covs = torch.from_numpy(arrays["cont_covs"]).to(dtype)
    x.size_factor = (torch.from_numpy(arrays["size_factor"]).to(dtype)
                     if "size_factor" in arrays else None)
    return x


def _outputs(vae, x, eps, eps_library=None):
    with torch.no_grad():
        inf = vae.inference(x, eps_noise=eps, eps_library=eps_library)
        gen = vae.generative(inf["z"], x.batch, logits=True, **vae.covariates_of(x))
        out = vae.loss(x, inf, gen)
        scale = vae.px_scale(gen["logits"])
    ours = {
        "q_m": inf["q_m"], "q_v": inf["q_v"], "z": inf["z"],
        # scvi-tools' inference library is the observed one (or the library encoder's draw);
        # a size factor scales the rate
        "library": (torch.log(x.library) if vae.l_encoder is None
                    else inf["library"]).reshape(-1, 1),
        "px_scale": scale,
        "px_rate": torch.exp(inf["library"]).reshape(-1, 1) * scale,
        "px_r": torch.exp(gen["px_r"]),
        "reconst_loss": out.reconstruction_loss, "kl": out.kl_local,
    }
    if vae.px_dropout_decoder is not None:
        ours["px_dropout"] = gen["px_dropout"]
    return ours


def _eps(arrays):
    return {"eps": torch.from_numpy(arrays["eps"]).double(),
            "eps_library": (torch.from_numpy(arrays["eps_library"]).double()
                            if "eps_library" in arrays else None)}


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("name", CONFIGS)
def test_float64_matches_scvi_tools(name, impl):
    from scvi_fast import functional

    if impl == "native" and not functional._is_available("native"):
        pytest.skip("the native extension is not built")
    vae, arrays, _ = covariate_vae(name, impl)
    x = covariate_batch(arrays)
    ours = _outputs(vae, x, **_eps(arrays))
    assert {f"{k}_f64" for k in ours} | {"loss_f64"} == {k for k in arrays if k.endswith("_f64")}
    for key, val in ours.items():
        ref = arrays[f"{key}_f64"]
        # 1e-9 relative: float64 evaluations of the same function, only the order differs
        np.testing.assert_allclose(val.detach().numpy(), ref, rtol=1e-9,
                                   atol=1e-12 * np.abs(ref).max(), err_msg=f"{name}/{key}")


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_gradients_reach_covariate_weights(name):
    """Every covariate parameter gets a finite, non-zero gradient from the loss."""
    vae, arrays, _ = covariate_vae(name)
    vae.train()
    x = covariate_batch(arrays)
    e = _eps(arrays)
    inf = vae.inference(x, eps_noise=e["eps"], eps_library=e["eps_library"])
    loss = vae.loss(x, inf, vae.generative(inf["z"], x.batch, **vae.covariates_of(x)))
    loss.loss.backward()
    names = [n for n, _ in vae.named_parameters() if "weight_co" in n]
    assert names
    for n, p in vae.named_parameters():
        if "weight_co" in n:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_missing_covariates_are_refused():
    vae, arrays, _ = covariate_vae("enc_deep")
    x = covariate_batch(arrays)
    x.cat_covs = None
    with pytest.raises(ValueError, match="categorical covariates"):
        vae.posterior(x)
    x = covariate_batch(arrays)
    x.cont_covs = None
    with pytest.raises(ValueError, match="continuous covariates"):
        vae.posterior(x)


def test_size_factors_scale_the_rate_of_a_library_encoder_model():
    """With size factors and a library encoder, the loss and the analysis' likelihood
    parameters read the size factors for the rate (as scvi-tools' ``generative``); the library
    encoder adds only its KL. Checked on the ``sf`` fixture's data with a fresh ZINB module
    (float64; the analysis returns float32 arrays, hence 1e-6 relative)."""
    from scvi_fast.analysis import _likelihood
    from scvi_fast.module import VAE

    _, arrays, cfg = covariate_vae("sf")
    x = covariate_batch(arrays)
    torch.manual_seed(0)
    vae = VAE(x.n_genes, n_batch=int(x.batch.max()) + 1, n_hidden=16, n_latent=4,
              gene_likelihood="zinb", use_observed_lib_size=False,
              library_log_means=np.full((1, int(x.batch.max()) + 1), 6.0),
              library_log_vars=np.full((1, int(x.batch.max()) + 1), 0.5), impl="torch",
              n_cats_per_cov=[len(cfg["categorical_covariate_categories"][k])
                              for k in cfg["categorical_covariate_keys"]],
              n_continuous_cov=2, encode_covariates=True,
              use_size_factor_key=True).double().eval()
    with torch.no_grad():
        inf = vae.inference(x, give_mean=True)
        assert torch.equal(inf["library"], torch.log(x.size_factor))
        assert inf["kl_l"].shape == (x.batch.numel(),) and (inf["kl_l"] > 0).all()
        out = vae.loss(x, inf, vae.generative(inf["z"], x.batch, **vae.covariates_of(x)))
        assert torch.equal(out.kl_local, inf["kl"] + inf["kl_l"])
        q_m, _ = vae.posterior(x)
        want = x.size_factor.reshape(-1, 1) * vae.decode_scale(q_m, x.batch,
                                                               **vae.covariates_of(x))
    got = _likelihood.likelihood_parameters(vae, [(None, x)], z_fn=lambda q_m, q_v, n: q_m)
    np.testing.assert_allclose(got["mean"], want.float().numpy(), rtol=1e-6)
