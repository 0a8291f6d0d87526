"""The likelihood ``p(x | z)`` of a decoded minibatch: its parameters and log-density, per gene
likelihood, and what is built on them (scvi-tools' ``get_likelihood_parameters``,
``get_marginal_ll``, ``get_latent_library_size`` and ``get_feature_correlation_matrix``).

Everything reads the module's generative outputs (``module.generative(z, batch,
logits=True)``) through one table, :data:`LIKELIHOODS`, keyed by ``module.gene_likelihood``
(``"nb"`` when the module has no such attribute). An entry gives the parameter dict
scvi-tools returns for that likelihood and the per-cell log-density of counts under it; a
likelihood without an entry raises :class:`NotImplementedError` naming it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from scvi_fast.module import sample_z
from scvi_fast.reference import csr_to_dense, log_nb_positive

#: elements of ``(samples x cells x genes)`` evaluated at once
MAX_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Likelihood:
    """How to read one gene likelihood off the module's generative outputs.

    ``parameters(module, generative, library)`` returns scvi-tools'
    ``get_likelihood_parameters`` dict (``"mean"``, and ``"dispersions"`` / ``"dropout"``
    where the likelihood has them) for exp-library ``library`` broadcast over the cells;
    ``scale(module, generative)`` the normalised expression (``px.scale``);
    ``with_library(params, scale, library)`` the parameters at another library size;
    ``log_prob(x, params)`` the log-density of dense counts ``x`` summed over genes.
    """

    parameters: Callable
    scale: Callable
    with_library: Callable
    log_prob: Callable


def _nb_scale(module, gen: dict) -> torch.Tensor:
    return module.px_scale(gen["logits"])


def _nb_parameters(module, gen: dict, library: torch.Tensor) -> dict[str, torch.Tensor]:
    return _nb_with_library({"dispersions": torch.exp(gen["px_r"].float())},
                            _nb_scale(module, gen), library)


def _nb_with_library(params: dict, scale: torch.Tensor, library: torch.Tensor) -> dict:
    mean = library.unsqueeze(-1) * scale
    return {"mean": mean, "dispersions": params["dispersions"].expand_as(mean)}


def _nb_log_prob(x: torch.Tensor, params: dict) -> torch.Tensor:
    # scvi-tools' NegativeBinomial(mu, theta).log_prob (log_nb_positive, eps 1e-8)
    return log_nb_positive(x, params["mean"], params["dispersions"]).sum(-1)


#: gene likelihood -> how to read it; other likelihoods add their entry here
LIKELIHOODS: dict[str, Likelihood] = {
    "nb": Likelihood(_nb_parameters, _nb_scale, _nb_with_library, _nb_log_prob),
}


def likelihood_of(module) -> Likelihood:
    """The :class:`Likelihood` of ``module`` (its ``gene_likelihood``, default ``"nb"``)."""
    name = getattr(module, "gene_likelihood", "nb")
    if name not in LIKELIHOODS:
        raise NotImplementedError(
            f"gene_likelihood={name!r} has no likelihood parameters / log-density in "
            f"scvi_fast.analysis yet (implemented: {sorted(LIKELIHOODS)})")
    return LIKELIHOODS[name]


def observed_library(x) -> torch.Tensor:
    """``(B,)`` total counts of a device minibatch (scVI's observed library size)."""
    return x.library.reshape(-1).float()


def dense_counts(x, n_genes: int) -> torch.Tensor:
    """``(B, G)`` float32 counts of a CSR device minibatch."""
    return csr_to_dense(x.indptr, x.indices, x.values, n_genes, dtype=torch.float32)


ZFn = Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]


def _default_z(generator=None) -> ZFn:
    return lambda q_m, q_v, n: sample_z(q_m, q_v, n, generator)


# --------------------------------------------------------------- parameters --
@torch.inference_mode()
def likelihood_parameters(module, batches: Iterable, n_samples: int = 1, give_mean: bool = False,
                          z_fn: ZFn | None = None) -> dict[str, np.ndarray]:
    """scvi-tools' ``get_likelihood_parameters``: for each cell, ``n_samples`` posterior draws
    of ``z`` decoded into the likelihood's parameters.

    Returns ``{"mean": ..., "dispersions": ...}`` (NB), float32 arrays ``(n_cells, n_genes)``
    for one sample, else ``(n_samples, n_cells, n_genes)``, averaged over the samples when
    ``give_mean``. ``z_fn(q_m, q_v, n)`` draws ``z`` (None: one ``(B, Z)`` draw; default
    :func:`~scvi_fast.module.sample_z`).
    """
    lik = likelihood_of(module)
    z_fn = z_fn or _default_z()
    parts: dict[str, list[np.ndarray]] = {}
    for _, x in batches:
        q_m, q_v = module.posterior(x)
        z = z_fn(q_m, q_v, None if n_samples == 1 else n_samples)
        gen = module.generative(z, x.batch, logits=True, **module.covariates_of(x))
        for k, v in lik.parameters(module, gen, observed_library(x)).items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
    out = {k: np.concatenate(v, axis=-2) for k, v in parts.items()}
    if give_mean and n_samples > 1:
        out = {k: v.mean(0) for k, v in out.items()}
    return out


# --------------------------------------------------------- marginal likelihood --
def _log_normal(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``sum_z log N(z | mean, var)`` over the last axis (torch's ``Normal.log_prob``)."""
    scale = var.sqrt()
    return (-((z - mean) ** 2) / (2 * var) - scale.log() - math.log(math.sqrt(2 * math.pi))).sum(-1)


def log_joint_terms(module, x, z: torch.Tensor, q_m, q_v, lik: Likelihood, n_genes: int):
    """``log p(z) + log p(x | z) - log q(z | x)`` for ``z`` of shape ``(S, B, Z)``: ``(S, B)``,
    evaluated in chunks of samples that bound the ``S x B x G`` temporaries."""
    counts = dense_counts(x, n_genes)
    library = observed_library(x)
    per = max(1, MAX_ELEMENTS // max(1, z.shape[1] * n_genes))
    out = []
    for s0 in range(0, z.shape[0], per):
        zs = z[s0 : s0 + per]
        gen = module.generative(zs, x.batch, logits=True, **module.covariates_of(x))
        log_px = lik.log_prob(counts, lik.parameters(module, gen, library))
        log_pz = _log_normal(zs, torch.zeros_like(zs), torch.ones_like(zs))
        out.append(log_pz + log_px - _log_normal(zs, q_m, q_v))
    return torch.cat(out, 0)


@torch.inference_mode()
def marginal_ll(module, batches: Iterable, n_mc_samples: int = 1000,
                n_mc_samples_per_pass: int = 1, return_mean: bool = True,
                z_fn: ZFn | None = None):
    """scvi-tools' ``get_marginal_ll``: the importance-sampled estimate
    ``logmeanexp_s [log p(z_s) + log p(x | z_s) - log q(z_s | x)]``, ``z_s ~ q(z | x)``.

    As scvi-tools, ``ceil(n_mc_samples / n_mc_samples_per_pass)`` passes draw
    ``n_mc_samples_per_pass`` samples each and the log-sum-exp is divided by
    ``n_mc_samples`` (so a total that overshoots is kept); the pass size does not change the
    estimate's distribution otherwise (samples are evaluated in memory-bounded chunks here).
    ``return_mean``: the mean over minibatches of each minibatch's mean (scvi-tools' rule), a
    float; else a CPU tensor ``(n_cells,)``.
    """
    lik = likelihood_of(module)
    if n_mc_samples_per_pass > n_mc_samples:
        warnings.warn("Number of chunks is larger than the total number of samples, setting it "
                      "to the number of samples", RuntimeWarning, stacklevel=3)
        n_mc_samples_per_pass = n_mc_samples
    total = int(np.ceil(n_mc_samples / n_mc_samples_per_pass)) * n_mc_samples_per_pass
    z_fn = z_fn or _default_z()
    results = []
    for _, x in batches:
        q_m, q_v = module.posterior(x)
        z = z_fn(q_m, q_v, total)
        terms = log_joint_terms(module, x, z, q_m, q_v, lik, module.n_input)
        ll = torch.logsumexp(terms, dim=0) - np.log(n_mc_samples)
        results.append(float(ll.mean()) if return_mean else ll.float().cpu())
    if return_mean:
        return float(np.mean(results)) if results else float("nan")
    return torch.cat(results) if results else torch.zeros(0)


# -------------------------------------------------------------- library size --
@torch.inference_mode()
def latent_library_size(module, batches: Iterable, give_mean: bool = True) -> np.ndarray:
    """scvi-tools' ``get_latent_library_size``: ``(n_cells, 1)`` library sizes.

    With the observed library (``use_observed_lib_size``, scVI's default) there is no
    posterior of the library: ``give_mean=False`` returns the observed total counts and
    ``give_mean=True`` raises scvi-tools' error.
    """
    if not getattr(module, "use_observed_lib_size", True):
        raise NotImplementedError("get_latent_library_size of a library encoder "
                                  "(use_observed_lib_size=False) is not implemented yet")
    if give_mean:
        raise RuntimeError(
            "The module for this model does not compute the posterior distribution for the "
            "library size. Set `give_mean` to False to use the observed library size instead.")
    # exp(log(total)), as scvi-tools forms it (the same float32 rounding)
    parts = [torch.exp(torch.log(observed_library(x))).reshape(-1, 1).cpu().numpy()
             for _, x in batches]
    return np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)


# -------------------------------------------------------------- correlations --
@torch.inference_mode()
def denoised_samples(module, batches: Iterable, n_samples: int, rna_size_factor: float,
                     transform_code: int | None, generator: torch.Generator | None = None,
                     z_fn: ZFn | None = None) -> np.ndarray:
    """scvi-tools' ``_get_denoised_samples``: Gamma draws around ``rna_size_factor * rho``.

    ``w ~ Gamma(theta, rate=(1 - p) / p)`` with ``p = rate / (rate + theta)`` and ``rate =
    rna_size_factor * rho`` (mean ``rna_size_factor * rho``, the NB's Gamma mixing
    distribution). Returns float32 ``(n_cells, n_genes)`` for one sample, else ``(n_cells,
    n_genes, n_samples)``.
    """
    lik = likelihood_of(module)
    z_fn = z_fn or _default_z(generator)
    parts = []
    for mb, x in batches:
        q_m, q_v = module.posterior(x)
        z = z_fn(q_m, q_v, None if n_samples == 1 else n_samples)
        b = int(mb.n_cells)
        codes = (x.batch.reshape(-1)[:b] if transform_code is None
                 else torch.full((b,), int(transform_code), dtype=torch.int64, device=q_m.device))
        gen = module.generative(z, codes, logits=True, **module.covariates_of(x))
        params = lik.parameters(module, gen, torch.ones_like(observed_library(x)))
        if "dispersions" not in params:
            raise NotImplementedError("denoised samples need a dispersion (NB or ZINB)")
        rate = rna_size_factor * lik.scale(module, gen)
        theta = params["dispersions"]
        p = rate / (rate + theta)
        # Gamma(concentration, rate) = standard Gamma(concentration) / rate
        w = torch._standard_gamma(theta.contiguous(), generator=generator) / ((1 - p) / p)
        w = w.float().cpu().numpy()
        parts.append(np.transpose(w, (1, 2, 0)) if n_samples > 1 else w)
    return np.concatenate(parts, axis=0)


def correlation_matrix(denoised: np.ndarray, n_samples: int,
                       correlation_type: str = "spearman") -> np.ndarray:
    """Gene-gene correlation of denoised samples stacked sample by sample (scvi-tools)."""
    flat = denoised if n_samples == 1 else np.concatenate(
        [denoised[:, :, i] for i in range(n_samples)], axis=0)
    flat = flat.astype(np.float64)
    if correlation_type == "pearson":
        return np.corrcoef(flat, rowvar=False)
    if correlation_type == "spearman":
        from scipy.stats import spearmanr

        return np.asarray(spearmanr(flat)[0])
    raise ValueError("Unknown correlation type. Choose one of 'spearman', 'pearson'.")
