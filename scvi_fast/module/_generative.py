"""The generative options of scVI: gene likelihood, dispersion, latent distribution, library.

scvi-tools' ``scvi.module.VAE`` takes ``gene_likelihood`` (``"zinb"``, its default, ``"nb"``,
``"poisson"``), ``dispersion`` (``"gene"``, ``"gene-batch"``, ``"gene-label"``,
``"gene-cell"``), ``latent_distribution`` (``"normal"``, ``"ln"``) and
``use_observed_lib_size``. This module holds what those choices change, as tables and small
functions that :class:`~scvi_fast.module.VAE` calls, so the encoder and decoder classes stay
as they are:

* :func:`dispersion_shape` / :func:`gather_dispersion`: ``px_r`` with scvi-tools' shapes
  (``(G,)``, ``(G, n_batch)``, ``(G, n_labels)``, or the decoder head ``px_r_decoder``) and
  the log inverse dispersion of each cell (``(G,)`` or ``(..., G)``);
* :func:`reconstruction_loss`: the per-cell negative log-likelihood of each gene likelihood,
  through the fused ops of :mod:`scvi_fast.functional`; :func:`rate_reconstruction_loss`
  the same from a given rate (the softplus scale of ``use_size_factor_key``);
* :func:`z_transformation`: identity, or the softmax of the logistic normal (``"ln"``);
* :func:`normal_kl`, :func:`library_prior` and :func:`init_library_size`: the library
  encoder's KL against scvi-tools' per-batch log-normal prior, computed from the data as
  ``scvi.model._utils._init_library_size``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from scvi_fast import functional as F_ops
from scvi_fast.reference import log_nb_positive, log_zinb_positive

GENE_LIKELIHOODS = ("zinb", "nb", "poisson")
DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
LATENT_DISTRIBUTIONS = ("normal", "ln")


def check_options(gene_likelihood: str, dispersion: str, latent_distribution: str,
                  use_observed_lib_size: bool) -> None:
    """Raise a ``ValueError`` naming the first option scvi_fast does not implement."""
    for name, value, allowed in (("gene_likelihood", gene_likelihood, GENE_LIKELIHOODS),
                                 ("dispersion", dispersion, DISPERSIONS),
                                 ("latent_distribution", latent_distribution,
                                  LATENT_DISTRIBUTIONS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    if not isinstance(use_observed_lib_size, (bool, np.bool_)):
        raise ValueError(f"use_observed_lib_size must be True or False; got "
                         f"{use_observed_lib_size!r}")


def dispersion_shape(dispersion: str, n_input: int, n_batch: int, n_labels: int) -> tuple | None:
    """Shape of scvi-tools' ``px_r`` parameter (None for ``"gene-cell"``, a decoder head).

    scvi-tools sizes the tables by its registry's ``n_batch`` / ``n_labels``, at least 1.
    """
    return {
        "gene": (n_input,),
        "gene-batch": (n_input, max(n_batch, 1)),
        "gene-label": (n_input, max(n_labels, 1)),
        "gene-cell": None,
    }[dispersion]


def gather_dispersion(px_r: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
    """The log inverse dispersion of each cell from a ``(G, K)`` table: ``px_r[:, codes].T``.

    scvi-tools forms it as ``linear(one_hot(codes), px_r)``; a row gather gives the same
    values (each output is one table entry times one plus zeros) and ``embedding``'s backward
    is a segment sum.
    """
    if codes is None:
        codes = torch.zeros(1, dtype=torch.int64, device=px_r.device)
    return torch.nn.functional.embedding(codes.reshape(-1), px_r.t())


def z_transformation(z: torch.Tensor, latent_distribution: str) -> torch.Tensor:
    """scvi-tools' ``Encoder.z_transformation``: identity, or ``softmax`` over the latent
    axis for the logistic normal (``"ln"``)."""
    return torch.softmax(z, dim=-1) if latent_distribution == "ln" else z


def normal_kl(q_m: torch.Tensor, q_v: torch.Tensor, p_m: torch.Tensor,
              p_v: torch.Tensor) -> torch.Tensor:
    """``KL(N(q_m, q_v) || N(p_m, p_v))`` element-wise, in torch's ``kl_divergence`` form
    (``Normal``-``Normal``, from the scales ``sqrt(var)``)."""
    q_s, p_s = q_v.sqrt(), p_v.sqrt()
    var_ratio = (q_s / p_s).pow(2)
    t1 = ((q_m - p_m) / p_s).pow(2)
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


def library_prior(log_means: torch.Tensor, log_vars: torch.Tensor,
                  codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` of each cell's log-library prior, ``(B,)``: its batch's entries of the
    ``(1, n_batch)`` tables (scvi-tools' ``_compute_local_library_params``)."""
    n = log_means.shape[1]
    if codes is None:
        codes = torch.zeros(1, dtype=torch.int64, device=log_means.device)
    codes = codes.reshape(-1)
    if n == 1:
        codes = torch.zeros_like(codes)
    return log_means[0].index_select(0, codes), log_vars[0].index_select(0, codes)


def init_library_size(totals: np.ndarray, batch: np.ndarray | None,
                      n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' ``_init_library_size``: ``(1, n_batch)`` mean and variance of the log total
    counts of each batch's cells (0 and 1 for an absent batch; an empty cell counts as 0 and
    warns, as there).

    ``totals``: per-cell total counts; ``batch``: per-cell batch codes (None: one batch).
    """
    n_batch = max(int(n_batch), 1)
    totals = np.asarray(totals, dtype=np.float64).reshape(-1)
    batch = np.zeros(totals.shape, dtype=np.int64) if batch is None else np.asarray(batch).reshape(-1)
    means, variances = np.zeros(n_batch), np.ones(n_batch)
    for b in np.unique(batch):
        # scvi-tools sums the batch's rows in the counts' dtype (float32 for an AnnData of
        # float32 counts): sum in float64, then round as float32, the same for integer totals
        sums = totals[batch == b].astype(np.float32)
        logs = np.ma.log(sums)
        if np.ma.is_masked(logs):
            warnings.warn("This dataset has some empty cells, this might fail inference."
                          "Data should be filtered with `scanpy.pp.filter_cells()`",
                          UserWarning, stacklevel=3)
        logs = logs.filled(0)
        means[int(b)] = np.mean(logs).astype(np.float32)
        variances[int(b)] = np.var(logs).astype(np.float32)
    return means.reshape(1, -1), variances.reshape(1, -1)


def reconstruction_loss(likelihood: str, scale, hidden: torch.Tensor, log_library: torch.Tensor,
                        px_r: torch.Tensor | None, dropout_head, x, impl: str) -> torch.Tensor:
    """Per-cell ``-log p(x | z, l)`` of a CSR minibatch from the decoder's last hidden layer.

    ``scale`` is the output layer (``weight``, ``bias``; logits ``h @ weight.T + bias``),
    ``dropout_head`` the zero-inflation layer (ZINB only), ``px_r`` the log inverse dispersion
    ``(G,)`` or ``(B, G)``. NB runs the output layer with the likelihood as one op (fused on
    the CPU for a per-gene ``px_r``, see :func:`scvi_fast.functional.nb_softmax_loglik_linear`;
    the ``B x G`` logits are never formed here); ZINB and Poisson form the logits (and the
    dropout logits) and call their fused likelihood op.
    """
    if likelihood == "nb":
        return -F_ops.nb_softmax_loglik_linear(hidden, scale.weight, scale.bias, log_library,
                                               px_r, x, impl=impl)
    logits = scale(hidden)
    if likelihood == "zinb":
        return -F_ops.zinb_softmax_loglik(logits, log_library, px_r, dropout_head(hidden), x,
                                          impl=impl)
    if likelihood == "poisson":
        return -F_ops.poisson_softmax_loglik(logits, log_library, x, impl=impl)
    raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}; got {likelihood!r}")


def rate_reconstruction_loss(likelihood: str, counts: torch.Tensor, mu: torch.Tensor,
                             px_r: torch.Tensor | None,
                             dropout_logits: torch.Tensor | None) -> torch.Tensor:
    """Per-cell ``-sum_g log p(x_bg | mu_bg, ...)`` of dense ``counts``
    ``(B, G)`` under a given rate ``mu`` ``(B, G)``, unfused (the fused ops take logits of a
    softmax; scvi-tools' ``use_size_factor_key`` scales a softplus instead).

    ``px_r``: log inverse dispersion ``(G,)`` or ``(B, G)`` (NB, ZINB); ``dropout_logits``:
    the zero-inflation logits ``(B, G)`` (ZINB). The densities are scvi-tools'
    ``log_nb_positive`` / ``log_zinb_positive`` and ``Poisson.log_prob``.
    """
    if likelihood == "poisson":
        return -(torch.xlogy(counts, mu) - mu - torch.lgamma(counts + 1)).sum(-1)
    theta = torch.exp(px_r).to(mu.dtype)
    if likelihood == "nb":
        return -log_nb_positive(counts, mu, theta).sum(-1)
    if likelihood == "zinb":
        return -log_zinb_positive(counts, mu, theta, dropout_logits.to(mu.dtype)).sum(-1)
    raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}; got {likelihood!r}")
