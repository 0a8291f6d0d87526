"""The likelihood ``p(x | z)`` of a decoded minibatch: its parameters and log-density, per gene
likelihood, and what is built on them (scvi-tools' ``get_likelihood_parameters``,
``get_marginal_ll``, ``get_latent_library_size`` and ``get_feature_correlation_matrix``).

Everything reads the module's generative outputs (``module.generative(z, batch,
logits=True)``) through one table, :data:`LIKELIHOODS`, keyed by ``module.gene_likelihood``
(``"nb"`` when the module has no such attribute). An entry gives the parameter dict
scvi-tools returns for that likelihood (NB: ``mean``, ``dispersions``; ZINB: also
``dropout``, the zero-inflation probability; Poisson: ``mean``) and the per-cell
log-density of counts under it; a likelihood without an entry raises
:class:`NotImplementedError` naming it. Posterior draws of ``z`` are decoded after the
module's ``z_transformation`` (the softmax of a logistic-normal model), and the library is
the observed total count or, for a model with a library encoder, a draw of its posterior
(:func:`library_draw`), as scvi-tools' ``inference`` gives them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from scvi_fast.module import sample_z
from scvi_fast.reference import csr_to_dense, log_nb_positive, log_zinb_positive

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
    #: the entries of ``parameters`` that ``get_likelihood_parameters`` returns (the others
    #: are kept for ``log_prob``)
    public: tuple = ("mean", "dispersions")


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


def _zinb_parameters(module, gen: dict, library: torch.Tensor) -> dict[str, torch.Tensor]:
    logits = gen["px_dropout"].float()
    return _zinb_with_library({"dispersions": torch.exp(gen["px_r"].float()),
                               "dropout": torch.sigmoid(logits), "dropout_logits": logits},
                              _nb_scale(module, gen), library)


def _zinb_with_library(params: dict, scale: torch.Tensor, library: torch.Tensor) -> dict:
    out = _nb_with_library(params, scale, library)
    for k in ("dropout", "dropout_logits"):
        out[k] = params[k].expand_as(out["mean"])
    return out


def _zinb_log_prob(x: torch.Tensor, params: dict) -> torch.Tensor:
    # scvi-tools' ZeroInflatedNegativeBinomial(mu, theta, zi_logits).log_prob
    return log_zinb_positive(x, params["mean"], params["dispersions"],
                             params["dropout_logits"]).sum(-1)


def _poisson_parameters(module, gen: dict, library: torch.Tensor) -> dict[str, torch.Tensor]:
    return _poisson_with_library({}, _nb_scale(module, gen), library)


def _poisson_with_library(params: dict, scale: torch.Tensor, library: torch.Tensor) -> dict:
    return {"mean": library.unsqueeze(-1) * scale}


def _poisson_log_prob(x: torch.Tensor, params: dict) -> torch.Tensor:
    # torch's Poisson(rate).log_prob, which scvi-tools' Poisson inherits
    rate = params["mean"]
    return (torch.xlogy(x, rate) - rate - torch.lgamma(x + 1)).sum(-1)


#: gene likelihood -> how to read it; other likelihoods add their entry here
LIKELIHOODS: dict[str, Likelihood] = {
    "nb": Likelihood(_nb_parameters, _nb_scale, _nb_with_library, _nb_log_prob),
    "zinb": Likelihood(_zinb_parameters, _nb_scale, _zinb_with_library, _zinb_log_prob,
                       public=("mean", "dispersions", "dropout")),
    "poisson": Likelihood(_poisson_parameters, _nb_scale, _poisson_with_library,
                          _poisson_log_prob, public=("mean",)),
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


def has_library_encoder(module) -> bool:
    """Whether ``module`` models the library with an encoder (``use_observed_lib_size=False``)."""
    return getattr(module, "l_encoder", None) is not None


def rate_library(module, x, lib: torch.Tensor) -> torch.Tensor:
    """What scales the expression rate of cells whose library (or library draws) is ``lib``:
    ``lib`` itself, or the size factors of a model with ``use_size_factor_key``, which
    scvi-tools' ``generative`` reads even where a library encoder is trained (broadcast to
    ``lib``'s shape)."""
    if not getattr(module, "use_size_factor_key", False):
        return lib
    return torch.exp(module.log_library(x)).to(lib.dtype).expand_as(lib)


def library_draw(module, x, n: int | None = None, generator: torch.Generator | None = None,
                 log: bool = False) -> torch.Tensor:
    """The library of each cell of a device minibatch, ``(B,)`` (``n`` None) or ``(n, B)``:
    the observed total counts, or for a model with a library encoder ``exp(l)`` with ``l``
    drawn from its posterior ``N(ql_m, ql_v)`` (``log``: ``l`` itself)."""
    if not has_library_encoder(module):
        lib = observed_library(x)  # size factors, where a model reads them: rate_library
        lib = lib if n is None else lib.expand(n, -1)
        return torch.log(lib) if log else lib
    ql_m, ql_v = module.library_posterior(x)
    shape = ql_m.shape if n is None else (n, *ql_m.shape)
    eps = torch.randn(shape, dtype=ql_m.dtype, device=ql_m.device, generator=generator)
    l = ql_m + torch.sqrt(ql_v) * eps
    return l if log else torch.exp(l)


def decode(module, z: torch.Tensor, batch, labels=None, **covariates) -> dict:
    """``module.generative`` of posterior draws ``z`` of the normal (transformed first);
    ``covariates``: the minibatch's ``cat_covs`` / ``cont_covs`` (``module.covariates_of``)."""
    return module.generative(module.z_transformation(z), batch, logits=True, labels=labels,
                             **covariates)


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

    Returns ``{"mean": ..., "dispersions": ...}`` (NB; ZINB adds ``"dropout"``, Poisson has
    only ``"mean"``), float32 arrays ``(n_cells, n_genes)`` for one sample, else
    ``(n_samples, n_cells, n_genes)``, averaged over the samples when ``give_mean``.
    ``z_fn(q_m, q_v, n)`` draws ``z`` (None: one ``(B, Z)`` draw; default
    :func:`~scvi_fast.module.sample_z`).
    """
    lik = likelihood_of(module)
    z_fn = z_fn or _default_z()
    parts: dict[str, list[np.ndarray]] = {}
    for _, x in batches:
        q_m, q_v = module.posterior(x)
        n = None if n_samples == 1 else n_samples
        z = z_fn(q_m, q_v, n)
        gen = decode(module, z, x.batch, getattr(x, "labels", None),
                     **module.covariates_of(x))
        params = lik.parameters(module, gen, rate_library(module, x, library_draw(module, x, n)))
        for k in lik.public:
            parts.setdefault(k, []).append(params[k].float().cpu().numpy())
    out = {k: np.concatenate(v, axis=-2) for k, v in parts.items()}
    if give_mean and n_samples > 1:
        out = {k: v.mean(0) for k, v in out.items()}
    return out


# --------------------------------------------------------- marginal likelihood --
def _log_normal(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``sum_z log N(z | mean, var)`` over the last axis (torch's ``Normal.log_prob``)."""
    scale = var.sqrt()
    return (-((z - mean) ** 2) / (2 * var) - scale.log() - math.log(math.sqrt(2 * math.pi))).sum(-1)


def log_joint_terms(module, x, z: torch.Tensor, q_m, q_v, lik: Likelihood, n_genes: int,
                    log_library: torch.Tensor | None = None):
    """``log p(z) + log p(x | z, l) - log q(z | x)`` for draws ``z`` of the posterior normal,
    ``(S, B, Z)``: ``(S, B)``, evaluated in chunks of samples that bound the ``S x B x G``
    temporaries.

    As scvi-tools' ``marginal_ll``, the densities of ``z`` are evaluated at the decoder's input
    (for ``"ln"`` the softmax of the draw). With a library encoder ``log_library`` holds the
    ``(S, B)`` draws of ``l`` and ``log p(l) - log q(l | x)`` is added (the per-batch prior).
    """
    counts = dense_counts(x, n_genes)
    library = observed_library(x) if log_library is None else None
    if log_library is not None:
        ql_m, ql_v = module.library_posterior(x)
        p_m, p_v = library_prior_of(module, x)
    per = max(1, MAX_ELEMENTS // max(1, z.shape[1] * n_genes))
    out = []
    for s0 in range(0, z.shape[0], per):
        zs = module.z_transformation(z[s0 : s0 + per])
        gen = module.generative(zs, x.batch, logits=True, labels=getattr(x, "labels", None),
                                 **module.covariates_of(x))
        lib = rate_library(module, x, library if log_library is None
                           else torch.exp(log_library[s0 : s0 + per]))
        log_px = lik.log_prob(counts, lik.parameters(module, gen, lib))
        log_pz = _log_normal(zs, torch.zeros_like(zs), torch.ones_like(zs))
        term = log_pz + log_px - _log_normal(zs, q_m, q_v)
        if log_library is not None:
            ls = log_library[s0 : s0 + per].unsqueeze(-1)
            term = (term + _log_normal(ls, p_m.unsqueeze(-1), p_v.unsqueeze(-1))
                    - _log_normal(ls, ql_m.unsqueeze(-1), ql_v.unsqueeze(-1)))
        out.append(term)
    return torch.cat(out, 0)


def library_prior_of(module, x) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` ``(B,)`` of each cell's log-library prior (library encoder models)."""
    from scvi_fast.module._generative import library_prior

    return library_prior(module.library_log_means, module.library_log_vars,
                         getattr(x, "batch", None))


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
        log_library = library_draw(module, x, total, log=True) if has_library_encoder(module) else None
        terms = log_joint_terms(module, x, z, q_m, q_v, lik, module.n_input, log_library)
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
    ``give_mean=True`` raises scvi-tools' error. With a library encoder: ``give_mean`` gives
    the log-normal posterior mean ``exp(ql_m + ql_v / 2)``, else ``exp`` of a draw.
    """
    if has_library_encoder(module):
        parts = []
        for _, x in batches:
            if give_mean:
                ql_m, ql_v = module.library_posterior(x)
                lib = torch.exp(ql_m + ql_v / 2)  # LogNormal(ql_m, sqrt(ql_v)).mean
            else:
                lib = library_draw(module, x)
            parts.append(lib.reshape(-1, 1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)
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
        gen = decode(module, z, codes, getattr(x, "labels", None), **module.covariates_of(x))
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
