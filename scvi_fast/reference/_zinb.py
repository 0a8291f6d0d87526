"""Zero-inflated negative-binomial and Poisson log-likelihoods, exactly as scvi-tools computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scvi_fast.reference._csr import csr_parts, csr_to_dense
from scvi_fast.reference._nb import LOW_PRECISION


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Element-wise ZINB log-density: NB(``mu``, ``theta``) with zero-inflation logit ``pi``.

    The same expression as ``scvi.distributions._negative_binomial.log_zinb_positive``::

        x = 0:  softplus(-pi + theta (log(theta+eps) - log(theta+mu+eps))) - softplus(-pi)
        x > 0:  -softplus(-pi) - pi + theta (log(theta+eps) - log(theta+mu+eps))
                + x (log(mu+eps) - log(theta+mu+eps)) + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)
    """
    softplus_pi = F.softplus(-pi)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (torch.log(theta + eps) - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    zero = x < eps
    return torch.where(zero, case_zero, case_non_zero)


def _dense_inputs(logits, log_library, X_csr):
    """``(x, mu)`` dense in the evaluation dtype (float32 for low-precision logits)."""
    if logits.dtype in LOW_PRECISION:
        logits = logits.float()
    indptr, indices, values = csr_parts(X_csr)
    x = csr_to_dense(indptr, indices, values, logits.shape[-1], dtype=logits.dtype)
    mu = torch.exp(log_library.reshape(-1, 1).to(logits.dtype)) * torch.softmax(logits, dim=-1)
    return x, mu


def zinb_softmax_loglik(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    px_r: torch.Tensor,
    dropout_logits: torch.Tensor,
    X_csr,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-cell ZINB log-likelihood of CSR counts under ``mu = exp(l) softmax(logits)``.

    Parameters
    ----------
    logits
        ``(B, G)`` decoder output before the softmax.
    log_library
        ``(B,)`` or ``(B, 1)`` log library size ``l``.
    px_r
        ``(G,)`` or ``(B, G)`` log inverse dispersion; ``theta = exp(px_r)``.
    dropout_logits
        ``(B, G)`` logits of the zero-inflation probability (scvi-tools' ``px_dropout``).
    X_csr
        The ``(B, G)`` counts in CSR form (see :func:`csr_parts`).
    eps
        scvi-tools' numerical floor inside the logarithms.

    Returns
    -------
    ``(B,)`` tensor ``sum_g log ZINB(x_bg | mu_bg, theta_bg, pi_bg)``, in float32 for
    bfloat16 / float16 inputs (the likelihood is always evaluated in float32 or better).
    """
    x, mu = _dense_inputs(logits, log_library, X_csr)
    theta = torch.exp(px_r).to(x.dtype)
    return log_zinb_positive(x, mu, theta, dropout_logits.to(x.dtype), eps).sum(-1)


def poisson_softmax_loglik(logits: torch.Tensor, log_library: torch.Tensor, X_csr) -> torch.Tensor:
    """Per-cell Poisson log-likelihood of CSR counts under ``rate = exp(l) softmax(logits)``.

    ``sum_g x log(rate) - rate - lgamma(x + 1)`` with ``0 log 0 = 0``, as
    ``torch.distributions.Poisson.log_prob`` (scvi-tools' ``Poisson``); shapes and dtypes as
    :func:`zinb_softmax_loglik`.
    """
    x, rate = _dense_inputs(logits, log_library, X_csr)
    return (torch.xlogy(x, rate) - rate - torch.lgamma(x + 1)).sum(-1)
