"""Likelihood parameters, marginal likelihood, library size, importance weights and gene
correlations against scvi-tools 1.4.2 (``tests/fixtures/scvi_api.npz``, made by
``make_scvi_api_fixtures.py`` on 16 cells of the stored ``default`` model).

The fixture records every ``z`` scvi-tools drew inside each call, so the sampled outputs are
compared exactly (to float32 rounding) by feeding those samples to scvi_fast's functions.
Tolerance: ``|a - b| <= 2e-6 + 2e-5 |b|``, the parity tests' float32 bound, except where a
quantity is a difference of sums over 1287 genes (noted below).
"""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import torch

import scvi_fast
from scvi_fast import analysis
from tests.helpers import FIXTURES, load_fixture, shared_file

RTOL, ATOL = 2e-5, 2e-6


@pytest.fixture(scope="module")
def api_case():
    arrays, cfg = load_fixture("api")
    _, default_cfg = load_fixture("default")
    adata = anndata.read_h5ad(shared_file(default_cfg["data_file"]))
    sub = adata[arrays["cell_index"]].copy()
    sub.obs["donor"] = sub.obs["donor"].astype(str)
    model = scvi_fast.SCVI.load(FIXTURES / "scvi_tools_models" / "default", adata=sub,
                                accelerator="cpu")
    assert list(sub.obs_names) == list(arrays["obs_names"])
    return arrays, model, sub


def _replay(*zs):
    """A ``z_fn`` handing out recorded samples, minibatch by minibatch along the cell axis."""
    z = torch.from_numpy(np.concatenate(zs, axis=-2) if len(zs) > 1 else zs[0])
    pos = [0]

    def z_fn(q_m, q_v, n):
        b = q_m.shape[0]
        out = z[..., pos[0] : pos[0] + b, :]
        pos[0] += b
        assert out.shape == ((b, q_m.shape[1]) if n is None else (n, b, q_m.shape[1]))
        return out

    return z_fn


@pytest.mark.parametrize("tag, n_samples, give_mean", [("s1", 1, False), ("s3", 3, False),
                                                        ("s3_mean", 3, True)])
def test_likelihood_parameters(api_case, tag, n_samples, give_mean):
    arrays, model, sub = api_case
    got = analysis.likelihood_parameters(model.module, model._iter(sub), n_samples, give_mean,
                                         z_fn=_replay(arrays[f"likelihood_{tag}/z"]))
    public = model.get_likelihood_parameters(sub, n_samples=n_samples, give_mean=give_mean)
    assert set(got) == set(public) == {"mean", "dispersions"}
    for k in got:
        want = arrays[f"likelihood_{tag}/{k}"]
        assert got[k].shape == public[k].shape == want.shape and got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], want, rtol=RTOL, atol=ATOL)


def test_latent_library_size(api_case):
    arrays, model, sub = api_case
    got = model.get_latent_library_size(sub, give_mean=False)
    np.testing.assert_array_equal(got, arrays["latent_library_size"])
    with pytest.raises(RuntimeError) as err:
        model.get_latent_library_size(sub)
    assert str(err.value) == str(arrays["latent_library_size_give_mean_error"])


def test_marginal_ll_with_scvi_tools_samples(api_case):
    """Per cell values are log-mean-exps of ``log p(x|z)`` (about -1500, sums over 1287
    genes): float32 rounding of those sums is ~1e-6 relative, inside the parity bound."""
    arrays, model, sub = api_case
    got = analysis.marginal_ll(model.module, model._iter(sub), n_mc_samples=50,
                               n_mc_samples_per_pass=25, return_mean=False,
                               z_fn=_replay(arrays["marginal_ll_cells/z"]))
    np.testing.assert_allclose(got.numpy(), arrays["marginal_ll_cells"], rtol=RTOL, atol=ATOL)
    # return_mean: the mean of minibatch means (minibatches of 5, 5, 5 and 1 cells)
    mean = analysis.marginal_ll(model.module, model._iter(sub, None, 5), n_mc_samples=20,
                                n_mc_samples_per_pass=20, return_mean=True,
                                z_fn=_replay(arrays["marginal_ll_mean_bs5/z"]))
    assert isinstance(mean, float)
    assert mean == pytest.approx(float(arrays["marginal_ll_mean_bs5"]), rel=RTOL)


def test_marginal_ll_in_distribution(api_case):
    """scvi_fast's own samples: the per-cell estimator (100 samples) has scvi-tools'
    distribution. scvi-tools' 40 estimates per cell give its mean and spread ``sd``; 8
    estimates here (seeded) are compared with ``|mean_fast - mean_st| < 4.5 sd sqrt(1/40 +
    1/8)`` for each of the 16 cells (two-sided normal tail 7e-6 per cell, 1e-4 for all). The
    estimator's spread (0.5-3 nats here) dwarfs float32 rounding; a wrong term (the prior,
    the posterior density or the likelihood) moves the mean by many nats."""
    arrays, model, sub = api_case
    reps = arrays["marginal_ll_repeats"].astype(np.float64)
    torch.manual_seed(0)
    ours = np.stack([model.get_marginal_ll(sub, n_mc_samples=100, return_mean=False).numpy()
                     for _ in range(8)]).astype(np.float64)
    sd = reps.std(0, ddof=1)
    bound = 4.5 * sd * np.sqrt(1 / len(reps) + 1 / len(ours))
    assert np.all(np.abs(ours.mean(0) - reps.mean(0)) < bound), (ours.mean(0) - reps.mean(0), bound)


def test_importance_weights(api_case):
    """``get_normalized_expression(n_samples_overall=40, weights="importance")``'s weights,
    from scvi-tools' own samples. A log-weight is a sum of differences of per-cell
    log-likelihoods of about -1500 nats; float32 rounding of those (~3e-3 nats) moves the
    normalised weights by up to ~1% relative: tolerance rtol 2e-2 on weights above 1e-6."""
    arrays, model, sub = api_case
    rows = np.arange(sub.n_obs)
    source = model._source(sub)

    def iter_batches(r):
        return scvi_fast.model._data.batches(model.module, model.device, source, r, None)

    out, p = analysis.importance_sample(
        model.module, iter_batches, rows, 40, None, np.random.default_rng(0),
        n_mc_samples=20, n_mc_samples_per_pass=10, return_weights=True,
        z_fn=_replay(arrays["importance/z"]), marginal_z_fn=_replay(arrays["importance/marginal_ll_z"]))
    want = arrays["importance/p"]
    assert out.shape == (40, sub.n_vars) and p.shape == want.shape
    assert p.sum() == pytest.approx(1.0, abs=1e-5)
    big = want > 1e-6
    np.testing.assert_allclose(p[big], want[big], rtol=2e-2)
    np.testing.assert_array_less(p[~big], 1e-5)


def test_feature_correlation_matrix(api_case):
    """Denoised samples are Gamma draws with mean ``rna_size_factor * rho`` and variance
    ``mean^2 / theta``; the public method returns a symmetric genes x genes DataFrame."""
    arrays, model, sub = api_case
    gen = torch.Generator().manual_seed(0)
    code = None
    with torch.inference_mode():
        d = analysis.denoised_samples(model.module, model._iter(sub.copy()[:2]), 4000, 1000,
                                      code, generator=gen, z_fn=lambda q_m, q_v, n: q_m.expand(n, *q_m.shape))
        q_m, _ = model.module.posterior(next(iter(model._iter(sub.copy()[:2])))[1])
        rho = model.module.decode_scale(q_m, torch.as_tensor(model.registry.codes_of(sub[:2], "batch")))
    theta = torch.exp(model.module.px_r).detach().numpy()
    mean = 1000 * rho.numpy()
    # 4000 draws: the sample mean is within 5 standard errors of the Gamma mean
    se = mean / np.sqrt(theta) / np.sqrt(4000)
    assert np.all(np.abs(d.mean(-1) - mean) < 5 * se + 1e-6)
    corr = model.get_feature_correlation_matrix(sub, n_samples=3, correlation_type="pearson")
    assert corr.shape == (sub.n_vars, sub.n_vars) and list(corr.index) == list(sub.var_names)
    finite = corr.to_numpy()[np.isfinite(corr.to_numpy())]
    assert finite.size and np.all(np.abs(finite) <= 1 + 1e-9)
