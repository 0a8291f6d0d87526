"""The scVI variational autoencoder: layers, ``inference -> generative -> loss``, the posterior
of ``z`` (:meth:`VAE.posterior`, :func:`sample_z`) and the frozen layers of query mapping."""

from scvi_fast.module._layers import CovariateLinear, DenseBlock, SparseInputLinear
from scvi_fast.module._query import (
    FrozenBatchNorm1d,
    QueryCovariateLinear,
    freeze_for_query,
    load_reference_state,
)
from scvi_fast.module._state import (
    StateMismatchError,
    check_state,
    state_checksums,
    verify_checksums,
)
from scvi_fast.module._vae import VAE, LossOutput, fp32, kl_weight, posterior_variance, sample_z

__all__ = [
    "VAE", "LossOutput", "kl_weight", "SparseInputLinear", "CovariateLinear", "DenseBlock",
    "fp32", "posterior_variance", "sample_z",
    "StateMismatchError", "check_state", "state_checksums", "verify_checksums",
    "FrozenBatchNorm1d", "QueryCovariateLinear", "freeze_for_query", "load_reference_state",
]
