"""The scVI variational autoencoder: layers, ``inference -> generative -> loss``, the posterior
of ``z`` (:meth:`VAE.posterior`, :func:`sample_z`) and what a query model trains (reference mapping)."""

from scvi_fast.module._layers import CovariateLinear, DenseBlock, SparseInputLinear
from scvi_fast.module._query import (
    FREEZE_DEFAULTS,
    keep_eval_mode,
    load_reference_state,
    set_online_update,
)
from scvi_fast.module._state import (
    StateMismatchError,
    check_state,
    state_checksums,
    tensor_crc32,
    verify_checksums,
)
from scvi_fast.module._posterior import LossOutput, fp32, kl_weight, posterior_variance, sample_z
from scvi_fast.module._vae import VAE

__all__ = [
    "VAE", "LossOutput", "kl_weight", "SparseInputLinear", "CovariateLinear", "DenseBlock",
    "fp32", "posterior_variance", "sample_z",
    "StateMismatchError", "check_state", "state_checksums", "tensor_crc32", "verify_checksums",
    "FREEZE_DEFAULTS", "keep_eval_mode", "load_reference_state", "set_online_update",
]
