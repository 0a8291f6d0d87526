"""Analysis on a trained VAE: the embedding, differential expression and posterior expression.

Functions here take a module and minibatch iterators, not the user-facing ``SCVI`` class
(which wraps them as ``get_latent_representation``, ``differential_expression``,
``get_normalized_expression``, ``posterior_predictive_sample``, ``get_likelihood_parameters``,
``get_marginal_ll``, ``get_latent_library_size`` and ``get_feature_correlation_matrix``). Integration metrics live in :mod:`scvi_fast.metrics`.
"""

from ._checks import NonFiniteOutputError, check_finite
from ._de import (
    bayes_factors,
    credible_intervals,
    estimate_delta,
    estimate_pseudocounts_offset,
    fdr_de_prediction,
)
from ._de_groups import comparisons, differential_expression, raw_counts_properties
from ._expression import normalized_expression, posterior_predictive, sample_scales
from ._importance import importance_probabilities, importance_sample
from ._likelihood import (
    LIKELIHOODS,
    Likelihood,
    correlation_matrix,
    denoised_samples,
    latent_library_size,
    likelihood_of,
    likelihood_parameters,
    marginal_ll,
)
from ._latent import default_batch_size, in_order_batches, latent_fn, latent_representation
from ._rows import NpyFile, map_rows

__all__ = [
    "LIKELIHOODS",
    "Likelihood",
    "NonFiniteOutputError",
    "NpyFile",
    "check_finite",
    "correlation_matrix",
    "denoised_samples",
    "importance_probabilities",
    "importance_sample",
    "latent_library_size",
    "likelihood_of",
    "likelihood_parameters",
    "marginal_ll",
    "bayes_factors",
    "comparisons",
    "credible_intervals",
    "default_batch_size",
    "differential_expression",
    "estimate_delta",
    "estimate_pseudocounts_offset",
    "fdr_de_prediction",
    "in_order_batches",
    "latent_fn",
    "latent_representation",
    "map_rows",
    "normalized_expression",
    "posterior_predictive",
    "raw_counts_properties",
    "sample_scales",
]
