"""The scVI variational autoencoder: layers, ``inference -> generative -> loss``."""

from scvi_fast.module._layers import CovariateLinear, DenseBlock, SparseInputLinear
from scvi_fast.module._vae import VAE, LossOutput, kl_weight

__all__ = ["VAE", "LossOutput", "kl_weight", "SparseInputLinear", "CovariateLinear", "DenseBlock"]
