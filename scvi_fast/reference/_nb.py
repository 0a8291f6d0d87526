"""Negative-binomial log-likelihood, exactly as scvi-tools computes it."""

from __future__ import annotations

import torch

from scvi_fast.reference._csr import csr_parts, csr_to_dense


def log_nb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Element-wise NB log-density with mean ``mu`` and inverse dispersion ``theta``.

    The same expression as ``scvi.distributions._negative_binomial.log_nb_positive``::

        theta (log(theta+eps) - log(theta+mu+eps)) + x (log(mu+eps) - log(theta+mu+eps))
        + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)
    """
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def nb_softmax_loglik(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    px_r: torch.Tensor,
    X_csr,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-cell NB log-likelihood of CSR counts under ``mu = exp(l) softmax(logits)``.

    Parameters
    ----------
    logits
        ``(B, G)`` decoder output before the softmax.
    log_library
        ``(B,)`` or ``(B, 1)`` log library size ``l``.
    px_r
        ``(G,)`` log inverse dispersion; ``theta = exp(px_r)``.
    X_csr
        The ``(B, G)`` counts in CSR form (see :func:`csr_parts`).
    eps
        scvi-tools' numerical floor inside the logarithms.

    Returns
    -------
    ``(B,)`` tensor: ``sum_g log NB(x_bg | mu_bg, theta_g)``.
    """
    indptr, indices, values = csr_parts(X_csr)
    x = csr_to_dense(indptr, indices, values, logits.shape[-1], dtype=logits.dtype)
    mu = torch.exp(log_library.reshape(-1, 1).to(logits.dtype)) * torch.softmax(logits, dim=-1)
    theta = torch.exp(px_r).to(logits.dtype)
    return log_nb_positive(x, mu, theta, eps).sum(-1)


def nb_softmax_loglik_linear(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    log_library: torch.Tensor,
    px_r: torch.Tensor,
    X_csr,
    eps: float = 1e-8,
) -> torch.Tensor:
    """:func:`nb_softmax_loglik` of ``logits = h @ weight.T + bias`` (the decoder's output layer).

    ``h`` is ``(B, H)``, ``weight`` ``(G, H)`` and ``bias`` ``(G,)`` or None, as in
    ``torch.nn.Linear``. Gradients flow to ``h``, ``weight``, ``bias`` and ``px_r``.
    """
    return nb_softmax_loglik(output_logits(h, weight, bias), log_library, px_r, X_csr, eps)


def output_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h @ weight.T + bias``, in float32 when autocast ran the GEMM in bfloat16 (the
    likelihood is always evaluated in float32 or better)."""
    logits = torch.nn.functional.linear(h, weight, bias)
    return logits.float() if logits.dtype == torch.bfloat16 else logits
