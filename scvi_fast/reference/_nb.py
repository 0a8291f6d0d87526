"""Negative-binomial log-likelihood, exactly as scvi-tools computes it."""

from __future__ import annotations

import torch

from scvi_fast.reference._csr import csr_parts, csr_to_dense

#: logit dtypes the likelihood is never evaluated in: they are read as float32
LOW_PRECISION = (torch.bfloat16, torch.float16)


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
    ``(B,)`` tensor: ``sum_g log NB(x_bg | mu_bg, theta_g)``, in float32 for bfloat16 /
    float16 logits (the likelihood is always evaluated in float32 or better).
    """
    if logits.dtype in LOW_PRECISION:
        logits = logits.float()
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
    ``torch.nn.Linear``. Gradients flow to ``h``, ``weight``, ``bias``, ``log_library`` and
    ``px_r``. Under autocast the layer runs in the autocast dtype and the likelihood in
    float32.
    """
    return linear_then_nb(nb_softmax_loglik, h, weight, bias, log_library, px_r, X_csr, eps)


def linear_then_nb(nb_op, h, weight, bias, log_library, px_r, X_csr, eps) -> torch.Tensor:
    """The output layer composed with a likelihood op: ``nb_op(F.linear(h, weight, bias),
    log_library, px_r, X_csr, eps)``.

    The composition every back-end without a fused layer + likelihood kernel uses (with its
    own ``nb_softmax_loglik`` as ``nb_op``): the ``B x G`` logits are formed by torch's GEMM, in
    the autocast dtype under autocast.
    """
    return nb_op(torch.nn.functional.linear(h, weight, bias), log_library, px_r, X_csr, eps)


def nb_bytes_moved(B, G, nnz, elem=4, index_elem=8, value_elem=4, indptr_elem=None):
    """``(forward, backward)`` compulsory bytes of the NB op, for effective-bandwidth reports.

    For ``B`` cells, ``G`` genes and ``nnz`` stored counts. ``elem``: bytes per logit (4 for
    float32, 2 for bfloat16); ``index_elem`` / ``value_elem`` / ``indptr_elem`` (default
    ``index_elem``): of the CSR arrays.

    What any implementation must move between the processor and memory: forward, the logits
    read once, the CSR, ``px_r`` and the per-cell inputs and outputs (log library in;
    log-likelihood, lse and C out); backward, the logits read once and their gradient written
    once, the CSR, ``px_r`` and its gradient, the per-cell saved values, upstream gradient and
    library gradient. Work the kernels do beyond that (a split forward's second read of its
    chunk, gathers at the non-zeros, the px_r partials) is not counted, so bytes / time is the
    effective bandwidth that compares with the memory's peak (the roofline of the op).
    """
    indptr_elem = index_elem if indptr_elem is None else indptr_elem
    csr = (B + 1) * indptr_elem + nnz * (index_elem + value_elem)
    fwd = B * G * elem + csr + G * 4 + 4 * B * 4
    bwd = 2 * B * G * elem + csr + 2 * G * 4 + 5 * B * 4
    return fwd, bwd
