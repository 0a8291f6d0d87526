"""The likelihood-based methods for every gene likelihood, the logistic-normal latent and the
library encoder: each reads the same parameters the module's loss reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scvi_fast
from scvi_fast.analysis import LIKELIHOODS
from scvi_fast.analysis._likelihood import dense_counts, library_draw
from scvi_fast.data import synthetic_anndata


@pytest.fixture(scope="module")
def adata():
    ad = synthetic_anndata(n_cells=90, n_genes=25, n_batches=2, n_cell_types=3, density=0.4,
                           seed=4)
    ad = ad[np.asarray(ad.X.sum(axis=1)).ravel() > 0].copy()
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch", labels_key="cell_type")
    return ad


def _model(adata, **options):
    model = scvi_fast.SCVI(adata, n_hidden=8, n_latent=3, impl="torch", seed=1, **options)
    model.train(max_epochs=2, device="cpu", progress_bar=False)
    return model


@pytest.mark.parametrize("options", [
    {"gene_likelihood": "zinb", "dispersion": "gene-label"},
    {"gene_likelihood": "nb", "dispersion": "gene-cell", "latent_distribution": "ln"},
    {"gene_likelihood": "poisson", "use_observed_lib_size": False},
], ids=lambda o: o["gene_likelihood"])
def test_log_density_of_the_table_is_the_module_loss(adata, options):
    """``LIKELIHOODS[...].log_prob`` at ``parameters(module, generative(z), exp(l))`` is minus the
    module's reconstruction loss for the same ``z`` and library (float64 module; the table
    reads theta and the dropout logits in float32, as every analysis output is float32:
    2e-6 relative, where a wrong term or parameter moves the result by 1e-2 or more)."""
    model = _model(adata, **options)
    vae = model.module.double().eval()
    lik = LIKELIHOODS[vae.gene_likelihood]
    for _, x in model._iter(batch_size=40):
        x.values, x.library = x.values.double(), x.library.double()
        with torch.no_grad():
            inf = vae.inference(x)
            gen = vae.generative(inf["z"], x.batch, logits=True, labels=x.labels)
            rec = vae.loss(x, inf, gen).reconstruction_loss
            params = lik.parameters(vae, gen, torch.exp(inf["library"]))
            log_px = lik.log_prob(dense_counts(x, vae.n_input).double(), params)
        np.testing.assert_allclose(-log_px.numpy(), rec.numpy(), rtol=2e-6)
        assert set(lik.public) <= set(params)
    model.module.float()


def test_likelihood_parameters_per_likelihood(adata):
    """ZINB: ``dropout`` in (0, 1) beside ``mean`` and ``dispersions`` (per cell for
    gene-batch); Poisson: ``mean`` only; shapes as scvi-tools (samples first)."""
    zinb = _model(adata, gene_likelihood="zinb", dispersion="gene-batch")
    p = zinb.get_likelihood_parameters(n_samples=3)
    assert sorted(p) == ["dispersions", "dropout", "mean"]
    assert all(v.shape == (3, adata.n_obs, adata.n_vars) for v in p.values())
    assert ((p["dropout"] > 0) & (p["dropout"] < 1)).all()
    codes = adata.obs["batch"].cat.codes.to_numpy()
    theta = np.exp(zinb.module.px_r.detach().numpy()).T  # (n_batch, G)
    np.testing.assert_allclose(p["dispersions"][0], theta[codes], rtol=1e-6)
    pois = _model(adata, gene_likelihood="poisson")
    p = pois.get_likelihood_parameters(give_mean=True, n_samples=2)
    assert sorted(p) == ["mean"] and p["mean"].shape == (adata.n_obs, adata.n_vars)


def test_zinb_posterior_predictive_is_nb_thinned_by_the_dropout(adata):
    """With the zero-inflation head's bias at -60 (pi = 0) ZINB draws equal the NB draws of the
    same weights and generator; at +60 (pi = 1) every draw is zero."""
    zinb = _model(adata, gene_likelihood="zinb")
    nb = scvi_fast.SCVI(adata, n_hidden=8, n_latent=3, impl="torch", gene_likelihood="nb")
    nb.module.load_state_dict({k: v for k, v in zinb.module.state_dict().items()
                               if not k.startswith("px_dropout_decoder")})
    nb.module.eval()
    bias = zinb.module.px_dropout_decoder.bias
    with torch.no_grad():
        bias.fill_(-60.0)
        torch.manual_seed(3)
        a = zinb.posterior_predictive_sample(n_samples=2)
        torch.manual_seed(3)
        b = nb.posterior_predictive_sample(n_samples=2)
        assert np.array_equal(a.todense(), b.todense()) and a.sum() > 0
        bias.fill_(60.0)
        assert zinb.posterior_predictive_sample(n_samples=2).sum() == 0


def test_poisson_posterior_predictive_mean(adata):
    """Poisson draws average to the likelihood's mean at fixed ``z`` (posterior variance made
    negligible): 400 draws, 5 standard errors."""
    model = _model(adata, gene_likelihood="poisson")
    with torch.no_grad():
        model.module.encoder.var.bias.fill_(-30.0)  # q_v = VAR_EPS: z is (nearly) q_m
        model.module.encoder.var.weight.zero_()
    idx = np.arange(6)
    draws = model.posterior_predictive_sample(indices=idx, n_samples=400).todense()
    mean = model.get_likelihood_parameters(indices=idx, n_samples=1)["mean"]
    got = draws.mean(-1)
    se = np.sqrt(mean / 400) + 1e-3
    assert (np.abs(got - mean) <= 5 * se + 0.02 * mean).all()


def test_library_encoder_and_logistic_normal_latent(adata):
    """Library encoder: ``get_latent_library_size(give_mean=True)`` is the log-normal mean
    ``exp(ql_m + ql_v / 2)``, a draw otherwise. ``ln``: samples and the mean lie on the simplex,
    the mean is the average softmax of draws, ``return_dist`` the normal's parameters."""
    model = _model(adata, use_observed_lib_size=False, latent_distribution="ln")
    vae = model.module
    (_, x), = list(model._iter(batch_size=1000))
    with torch.no_grad():
        ql_m, ql_v = vae.library_posterior(x)
        q_m, q_v = vae.posterior(x)
    lib = model.get_latent_library_size(give_mean=True)
    np.testing.assert_allclose(lib[:, 0], torch.exp(ql_m + ql_v / 2).numpy(), rtol=1e-6)
    torch.manual_seed(0)
    drawn = model.get_latent_library_size(give_mean=False)[:, 0]
    assert drawn.shape == (adata.n_obs,) and not np.allclose(drawn, lib[:, 0])
    torch.manual_seed(1)
    assert library_draw(vae, x, 5).shape == (5, adata.n_obs)
    mean = model.get_latent_representation(mc_samples=20000)
    sample = model.get_latent_representation(give_mean=False)
    np.testing.assert_allclose(mean.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(sample.sum(1), 1, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    z = q_m + q_v.sqrt() * torch.randn((20000, *q_m.shape), generator=g)
    # two Monte-Carlo means of 20000 draws: per-entry standard error about 2e-3 each
    np.testing.assert_allclose(mean, torch.softmax(z, -1).mean(0).numpy(), atol=1.5e-2)
    m, v = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(m, q_m.numpy(), rtol=1e-6)
    np.testing.assert_allclose(v, q_v.numpy(), rtol=1e-6)
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=5))
    with pytest.raises(NotImplementedError, match="importance"):
        model.get_normalized_expression(n_samples_overall=10, weights="importance")
