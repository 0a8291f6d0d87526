"""Bayesian differential expression with scvi-tools' semantics (``vanilla`` and ``change``).

The statistics follow ``scvi.model.base.DifferentialComputation.get_bayes_factors`` and
``_de_core`` of scvi-tools 1.4:

* For each group, ``n_samples_overall`` (5000) posterior samples of the normalised
  expression ``rho`` are drawn (:func:`~scvi_fast.analysis.sample_scales`), split evenly
  over the batches decoded in: the cells' own batches by default, every batch category
  (or the codes of ``batchid1``/``batchid2``) with ``batch_correction=True``.
* ``vanilla`` (Lopez et al. 2018): ``proba_m1 = P(rho1 > rho2)`` over paired samples,
  ``bayes_factor = log(proba_m1 + eps) - log(proba_m2 + eps)``, sorted by the Bayes factor.
* ``change`` (Boyeau et al. 2019): ``lfc = log2(rho1 + pc) - log2(rho2 + pc)`` with a
  pseudocount ``pc`` estimated from genes unexpressed in either group (90% quantile of their
  largest sampled scale, divided by the number of genes); ``proba_de = max(P(lfc >= delta),
  P(lfc < -delta))``; ``bayes_factor = log(proba_de + eps) - log(1 - proba_de + eps)``;
  LFC summaries use ``1e-3 * pc``; sorted by ``proba_de``; genes are called DE by the
  posterior expected FDR at ``fdr_target``.

This module holds the statistics (pure functions of posterior samples); the driver that
samples a module for groups of cells is :mod:`scvi_fast.analysis._de_groups`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd

EPS = 1e-8
#: genes processed at once when summarising LFC samples (bounds the temporaries)
GENE_CHUNK = 512


# ----------------------------------------------------------------- pure statistics --
def fdr_de_prediction(posterior_probas: pd.Series, fdr: float = 0.05) -> pd.Series:
    """Tag features as DE so that the posterior expected FDR is at most ``fdr``.

    Sorting by decreasing ``p``, the expected FDR of the top ``k`` is
    ``sum_{i<=k} (1 - p_i) / k``; the first ``d`` features are called DE, where ``d`` is
    the number of prefixes whose expected FDR is ``<= fdr`` (scvi-tools'
    ``_fdr_de_prediction``).
    """
    if posterior_probas.ndim != 1:
        raise ValueError("posterior_probas should be 1-dimensional")
    original_index = posterior_probas.index
    sorted_p = posterior_probas.sort_values(ascending=False)
    cumulative_fdr = (1.0 - sorted_p).cumsum() / (1.0 + np.arange(len(sorted_p)))
    d = int((cumulative_fdr <= fdr).sum())
    is_de = pd.Series(np.zeros(len(sorted_p), dtype=bool), index=sorted_p.index)
    is_de.iloc[:d] = True
    return is_de.loc[original_index]


def estimate_pseudocounts_offset(
    scales_a: np.ndarray,
    scales_b: np.ndarray,
    where_zero_a: np.ndarray,
    where_zero_b: np.ndarray,
    quantile: float = 0.9,
) -> float:
    """Pseudocount that shrinks the LFC of unexpressed genes to zero (scvi-tools' rule)."""
    max_a, max_b = np.max(scales_a, 0), np.max(scales_b, 0)
    if not (max_a.shape == where_zero_a.shape == max_b.shape == where_zero_b.shape):
        raise ValueError("dimension mismatch between scales and masks for the pseudocount offset")
    eps_a = np.quantile(max_a[where_zero_a], q=quantile) if where_zero_a.sum() >= 1 else 1e-10
    eps_b = np.quantile(max_b[where_zero_b], q=quantile) if where_zero_b.sum() >= 1 else 1e-10
    return float(np.maximum(1e-10, np.maximum(eps_a, eps_b) / len(max_a)))


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """LFC threshold from a 3-component Gaussian mixture on the per-gene LFC means."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError(
            "delta=None estimates the LFC threshold with scikit-learn's GaussianMixture: "
            "pip install 'scvi_fast[metrics]' (or scikit-learn), or pass a number as delta"
        ) from err
    lfc_means = np.asarray(lfc_means)
    if lfc_means.ndim >= 2:
        raise ValueError("lfc_means should be 1-dimensional of shape (n_genes,)")
    gmm = GaussianMixture(n_components=3).fit(lfc_means[:, None])
    vals = np.sort(gmm.means_.squeeze())
    return float(np.maximum(min_thres, coef * np.abs(vals[[0, -1]]).mean()))


def credible_intervals(samples: np.ndarray, confidence_level: float = 0.94) -> np.ndarray:
    """Highest-posterior-density interval per column: ``(n_features, 2)`` (min, max)."""
    s = np.sort(np.asarray(samples), axis=0)
    n = s.shape[0]
    inc = int(np.floor(confidence_level * n))
    n_int = n - inc
    if n_int <= 0:
        raise ValueError("too few samples for a credible interval at this level")
    width = s[inc:] - s[:n_int]
    lo = np.argmin(width, axis=0)
    cols = np.arange(s.shape[1])
    return np.stack([s[lo, cols], s[lo + inc, cols]], axis=1)


def describe_lfc(
    scales_1: np.ndarray,
    scales_2: np.ndarray,
    pseudocounts: float,
    cred_interval_lvls: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """``lfc_mean/median/std/min/max`` (and HPD intervals) of ``log2`` ratios, gene-chunked."""
    g = scales_1.shape[1]
    keys = ["mean", "median", "std", "min", "max"]
    levels = list(cred_interval_lvls or [])
    for lvl in levels:
        keys += [f"confidence_interval_{str(lvl)[:5]}_min", f"confidence_interval_{str(lvl)[:5]}_max"]
    out = {k: np.empty(g, dtype=np.float64) for k in keys}
    for j0 in range(0, g, GENE_CHUNK):
        j1 = min(g, j0 + GENE_CHUNK)
        lfc = np.log2(scales_1[:, j0:j1] + pseudocounts) - np.log2(scales_2[:, j0:j1] + pseudocounts)
        out["mean"][j0:j1] = lfc.mean(0)
        out["median"][j0:j1] = np.median(lfc, 0)
        out["std"][j0:j1] = lfc.std(0)
        out["min"][j0:j1] = lfc.min(0)
        out["max"][j0:j1] = lfc.max(0)
        for lvl in levels:
            ci = credible_intervals(lfc, lvl)
            out[f"confidence_interval_{str(lvl)[:5]}_min"][j0:j1] = ci[:, 0]
            out[f"confidence_interval_{str(lvl)[:5]}_max"][j0:j1] = ci[:, 1]
    return out


def bayes_factors(
    scales_1: np.ndarray,
    scales_2: np.ndarray,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    pseudocounts: float | None = None,
    where_zero_1: np.ndarray | None = None,
    where_zero_2: np.ndarray | None = None,
    test_mode: Literal["two", "three"] = "three",
    change_fn: str | Callable | None = None,
    m1_domain_fn: Callable | None = None,
    cred_interval_lvls: Sequence[float] | None = None,
) -> dict[str, np.ndarray | float]:
    """DE statistics from paired posterior scale samples ``(n, G)`` of the two groups.

    The per-gene columns of scvi-tools' ``get_bayes_factors`` (before the raw-count
    statistics are appended); ``where_zero_*`` mark genes with mean count below
    ``threshold_counts`` in each group, used to estimate ``pseudocounts`` when None.
    """
    if scales_1.shape != scales_2.shape:
        raise ValueError(
            f"paired scale samples differ in shape: {scales_1.shape} vs {scales_2.shape}; "
            "pass use_permutation=True to pair groups sampled in different batch sets"
        )
    mean1, mean2 = scales_1.mean(0), scales_2.mean(0)
    if mode == "vanilla":
        return {**_vanilla(scales_1, scales_2), "scale1": mean1, "scale2": mean2}
    if mode != "change":
        raise ValueError(f"mode must be 'vanilla' or 'change'; got {mode!r}")
    if pseudocounts is None:
        if where_zero_1 is None or where_zero_2 is None:
            raise ValueError("estimating pseudocounts needs where_zero_1 and where_zero_2")
        pseudocounts = estimate_pseudocounts_offset(scales_1, scales_2, where_zero_1, where_zero_2)
    if change_fn not in (None, "log-fold"):
        if not callable(change_fn):
            raise ValueError("'change_fn' attribute not understood")
        lfc_fn = change_fn
    else:
        def lfc_fn(x, y, pc):
            return np.log2(x + pc) - np.log2(y + pc)

    g = scales_1.shape[1]
    custom = change_fn not in (None, "log-fold") or m1_domain_fn is not None
    if delta is None or custom:
        # general path (custom functions or an estimated delta): whole-matrix evaluation
        change = lfc_fn(scales_1, scales_2, pseudocounts)
        delta_ = estimate_delta(change.mean(0)) if delta is None else delta
        if m1_domain_fn is None:
            plus, minus = change >= delta_, change < -delta_
        else:
            plus, minus = m1_domain_fn(change)
        p_plus, p_minus = np.mean(plus, 0), np.mean(minus, 0)
        if custom:
            lfc_stats = _describe_samples(lfc_fn(scales_1, scales_2, 1e-3 * pseudocounts), cred_interval_lvls)
        else:
            lfc_stats = describe_lfc(scales_1, scales_2, 1e-3 * pseudocounts, cred_interval_lvls)
    else:
        delta_ = float(delta)
        p_plus = np.empty(g, dtype=np.float64)
        p_minus = np.empty(g, dtype=np.float64)
        for j0 in range(0, g, GENE_CHUNK):
            j1 = min(g, j0 + GENE_CHUNK)
            change = lfc_fn(scales_1[:, j0:j1], scales_2[:, j0:j1], pseudocounts)
            p_plus[j0:j1] = np.mean(change >= delta_, 0)
            p_minus[j0:j1] = np.mean(change < -delta_, 0)
        lfc_stats = describe_lfc(scales_1, scales_2, 1e-3 * pseudocounts, cred_interval_lvls)
    proba_de = p_plus + p_minus if test_mode == "two" else np.maximum(p_plus, p_minus)
    return {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
        "scale1": mean1,
        "scale2": mean2,
        "pseudocounts": pseudocounts,
        "delta": delta_,
        **{f"lfc_{k}": v for k, v in lfc_stats.items()},
    }


def _vanilla(scales_1: np.ndarray, scales_2: np.ndarray) -> dict[str, np.ndarray]:
    """``proba_m1 = P(rho1 > rho2)`` over paired samples, its complement and the Bayes factor."""
    p1 = np.empty(scales_1.shape[1], dtype=np.float64)
    for j0 in range(0, len(p1), GENE_CHUNK):
        j1 = min(len(p1), j0 + GENE_CHUNK)
        p1[j0:j1] = np.mean(scales_1[:, j0:j1] > scales_2[:, j0:j1], 0)
    p2 = 1.0 - p1
    return {"proba_m1": p1, "proba_m2": p2, "bayes_factor": np.log(p1 + EPS) - np.log(p2 + EPS)}


def _describe_samples(samples: np.ndarray, cred_interval_lvls) -> dict[str, np.ndarray]:
    out = {
        "mean": samples.mean(0),
        "median": np.median(samples, 0),
        "std": samples.std(0),
        "min": samples.min(0),
        "max": samples.max(0),
    }
    for lvl in cred_interval_lvls or []:
        ci = credible_intervals(samples, lvl)
        out[f"confidence_interval_{str(lvl)[:5]}_min"] = ci[:, 0]
        out[f"confidence_interval_{str(lvl)[:5]}_max"] = ci[:, 1]
    return out
