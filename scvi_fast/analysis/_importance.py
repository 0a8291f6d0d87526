"""Importance-weighted posterior samples of the expression (scvi-tools' ``weights="importance"``).

scvi-tools (``RNASeqMixin.get_importance_weights``, Boyeau et al.) draws
``n_samples_overall`` expression samples for a group of ``N`` cells from the ``S * N`` decoded
posterior samples (``S = n_samples_overall // N + 1``) with probabilities proportional to

    w_i = sum_a p(z_i) p(x_a | z_i) / p(x_a) / sum_a' q(z_i | x_a')

over anchor cells ``a`` (the group, or ``max_cells`` of it drawn without replacement):
``p(x_a)`` is the anchor's marginal likelihood (:func:`~scvi_fast.analysis.marginal_ll`),
``p(x_a | z_i)`` the likelihood of the anchor's counts under sample ``i``'s decoded
expression at the anchor's library size, and the denominator the group's aggregate
posterior. ``truncation`` clamps the log-weights below at their log-mean (Ionides 2008).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ._likelihood import (
    MAX_ELEMENTS,
    ZFn,
    _default_z,
    _log_normal,
    dense_counts,
    has_library_encoder,
    likelihood_of,
    marginal_ll,
    observed_library,
)


def importance_probabilities(log_pz: torch.Tensor, log_qz: torch.Tensor, log_px_z: torch.Tensor,
                             log_px: torch.Tensor, truncation: bool = False) -> np.ndarray:
    """Normalised importance weights ``(M,)`` from ``log p(z_i)`` ``(M,)``, ``log q(z_i | x_a)``
    and ``log p(x_a | z_i)`` ``(M, A)`` and ``log p(x_a)`` ``(A,)`` (scvi-tools' formula)."""
    w = torch.logsumexp(log_pz.reshape(-1, 1) + log_px_z - log_px.reshape(1, -1)
                        - torch.logsumexp(log_qz, 1, keepdim=True), dim=1)
    if truncation:
        tau = torch.logsumexp(w, 0) - np.log(w.shape[0])
        w = torch.clamp(w, min=tau)
    return (w - torch.logsumexp(w, 0)).exp().cpu().numpy()


@torch.inference_mode()
def importance_sample(module, iter_batches: Callable, rows: np.ndarray, n_samples_overall: int,
                      transform_code: int | None, rng: np.random.Generator,
                      generator: torch.Generator | None = None,
                      library_size: float | str = 1.0, gene_idx: np.ndarray | None = None,
                      max_cells: int = 1024, truncation: bool = False, n_mc_samples: int = 500,
                      n_mc_samples_per_pass: int = 250, z_fn: ZFn | None = None,
                      marginal_z_fn: ZFn | None = None, return_weights: bool = False):
    """``n_samples_overall`` rows of expression for the cells ``rows``, drawn with importance
    weights (see the module docstring).

    ``iter_batches(rows)`` yields ``(host, device)`` minibatches of the given source rows in
    order. ``transform_code``: the batch to decode in (None: each cell's own).
    ``library_size``: 1 (normalised expression), a number, or ``"latent"`` (the cell's
    observed library, the likelihood's mean). ``z_fn`` / ``marginal_z_fn`` draw the samples
    of the expression and of the anchors' marginal likelihood (default: from ``generator``).

    Returns float32 ``(n_samples_overall, n_genes)`` (``gene_idx`` columns), and the weights
    ``(S * N,)`` too with ``return_weights``.
    """
    lik = likelihood_of(module)
    if has_library_encoder(module) or getattr(module, "latent_distribution", "normal") != "normal":
        raise NotImplementedError(
            "weights='importance' is implemented for models with the observed library size and "
            "latent_distribution='normal'; use weights='uniform'")
    n = len(rows)
    if n < 1:
        raise ValueError("cannot sample the posterior of an empty cell group")
    s = n_samples_overall // n + 1
    z_fn = z_fn or _default_z(generator)
    gidx = None if gene_idx is None else torch.as_tensor(np.asarray(gene_idx, dtype=np.int64))
    zs, scales, thetas, exprs, qm, qv = [], [], [], [], [], []
    for mb, x in iter_batches(rows):
        q_m, q_v = module.posterior(x)
        z = z_fn(q_m, q_v, None if s == 1 else s).reshape(s, q_m.shape[0], -1)
        b = int(mb.n_cells)
        codes = (x.batch.reshape(-1)[:b] if transform_code is None
                 else torch.full((b,), int(transform_code), dtype=torch.int64, device=q_m.device))
        gen = module.generative(z, codes, logits=True, labels=getattr(x, "labels", None),
                                **module.covariates_of(x))
        scale = lik.scale(module, gen)  # (S, B, G)
        params = lik.parameters(module, gen, torch.ones_like(observed_library(x)))
        expr = (observed_library(x).reshape(1, -1, 1) * scale if library_size == "latent"
                else scale * float(library_size))
        if gidx is not None:
            expr = expr.index_select(-1, gidx.to(expr.device))
        zs.append(z)
        scales.append(scale)
        thetas.append(params)
        exprs.append(expr.float().cpu())
        qm.append(q_m)
        qv.append(q_v)
    z = torch.cat(zs, 1).reshape(s * n, -1)
    scale = torch.cat(scales, 1).reshape(s * n, -1)
    params = {k: torch.cat([p[k] for p in thetas], 1).reshape(s * n, -1)
              for k in thetas[0] if k != "mean"}
    q_m, q_v = torch.cat(qm), torch.cat(qv)

    anchors = np.arange(n) if n <= max_cells else np.sort(rng.choice(n, max_cells, replace=False))
    log_px = marginal_ll(module, iter_batches(rows[anchors]), n_mc_samples=n_mc_samples,
                         n_mc_samples_per_pass=n_mc_samples_per_pass, return_mean=False,
                         z_fn=marginal_z_fn or _default_z(generator)).to(z.device)
    a_idx = torch.as_tensor(anchors, device=z.device)
    qm_a, qv_a = q_m.index_select(0, a_idx), q_v.index_select(0, a_idx)
    counts, libs = [], []
    for _, x in iter_batches(rows[anchors]):
        counts.append(dense_counts(x, module.n_input))
        libs.append(observed_library(x))
    x_a, lib_a = torch.cat(counts), torch.cat(libs)

    m, a, g = z.shape[0], len(anchors), scale.shape[-1]
    log_pz = _log_normal(z, torch.zeros_like(z), torch.ones_like(z))
    log_qz = torch.empty(m, a, device=z.device)
    log_px_z = torch.empty(m, a, device=z.device)
    m_step = max(1, MAX_ELEMENTS // max(1, a * z.shape[1]))
    for m0 in range(0, m, m_step):
        log_qz[m0 : m0 + m_step] = _log_normal(z[m0 : m0 + m_step, None], qm_a[None], qv_a[None])
    a_step = max(1, min(a, MAX_ELEMENTS // g))
    m_step = max(1, MAX_ELEMENTS // (a_step * g))
    for m0 in range(0, m, m_step):
        sl = slice(m0, m0 + m_step)
        part = {k: v[sl] for k, v in params.items()}
        for a0 in range(0, a, a_step):
            al = slice(a0, a0 + a_step)
            p_ma = lik.with_library(part, scale[sl], lib_a[al].reshape(-1, 1))  # (A, M, G)
            log_px_z[sl, al] = lik.log_prob(x_a[al].unsqueeze(1), p_ma).T
    p = importance_probabilities(log_pz, log_qz, log_px_z, log_px, truncation)
    rows_drawn = rng.choice(m, n_samples_overall, p=p / p.sum(), replace=True)
    out = torch.cat(exprs, 1).reshape(m, -1).numpy()[rows_drawn]
    return (out, p) if return_weights else out
