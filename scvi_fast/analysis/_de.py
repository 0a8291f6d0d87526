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

The entry point :func:`differential_expression` takes a module and a callable that
iterates minibatches over given rows, never the user-facing model class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ._expression import sample_scales

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
        p1 = np.empty(scales_1.shape[1], dtype=np.float64)
        for j0 in range(0, len(p1), GENE_CHUNK):
            j1 = min(len(p1), j0 + GENE_CHUNK)
            p1[j0:j1] = np.mean(scales_1[:, j0:j1] > scales_2[:, j0:j1], 0)
        p2 = 1.0 - p1
        return {
            "proba_m1": p1,
            "proba_m2": p2,
            "bayes_factor": np.log(p1 + EPS) - np.log(p2 + EPS),
            "scale1": mean1,
            "scale2": mean2,
        }
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


# ----------------------------------------------------------------- raw statistics --
def raw_counts_properties(batches: Iterable, n_genes: int, masks: Sequence[np.ndarray]) -> list[dict]:
    """Per-group ``raw_mean``, ``non_zeros_proportion`` and ``raw_normalized_mean`` in one pass.

    ``masks`` are boolean arrays over source rows; ``raw_normalized_mean`` scales each cell
    to 1e4 total counts (scvi-tools' ``scrna_raw_counts_properties``). Streams host
    minibatches, so memory is ``O(n_groups x n_genes)``.
    """
    k = len(masks)
    sums = np.zeros((k, n_genes))
    nnz = np.zeros((k, n_genes))
    norm = np.zeros((k, n_genes))
    counts = np.array([int(np.count_nonzero(m)) for m in masks])
    for mb in batches:
        obs = np.asarray(mb.obs_idx)
        indptr = np.asarray(mb.indptr)
        row = np.repeat(np.arange(len(obs)), np.diff(indptr))
        cols = np.asarray(mb.indices).astype(np.int64)
        vals = np.asarray(mb.values, dtype=np.float64)
        scale = 1e4 / np.asarray(mb.library, dtype=np.float64)
        for i, m in enumerate(masks):
            sel = m[obs][row]
            if not sel.any():
                continue
            c, v = cols[sel], vals[sel]
            sums[i] += np.bincount(c, weights=v, minlength=n_genes)
            nnz[i] += np.bincount(c, weights=(v != 0).astype(np.float64), minlength=n_genes)
            norm[i] += np.bincount(c, weights=v * scale[row[sel]], minlength=n_genes)
    denom = np.maximum(counts, 1)[:, None]
    return [
        {"raw_mean": sums[i] / denom[i], "non_zeros_proportion": nnz[i] / denom[i],
         "raw_normalized_mean": norm[i] / denom[i]}
        for i in range(k)
    ]


# ------------------------------------------------------------------- groups --
def _mask_of(idx, obs: pd.DataFrame | None, n: int, what: str) -> np.ndarray:
    """A boolean mask from a boolean array, integer indices or an ``obs.query`` string."""
    if isinstance(idx, str):
        if obs is None:
            raise ValueError(f"{what} is a query string, but the data has no obs table")
        return np.asarray(obs.index.isin(obs.query(idx).index))
    arr = np.asarray(idx).ravel()
    if arr.dtype == bool:
        if len(arr) != n:
            raise ValueError(f"{what} is a boolean mask of length {len(arr)}; the data has {n} cells")
        return arr.copy()
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be a boolean mask, integer indices or a query string")
    mask = np.zeros(n, dtype=bool)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise IndexError(f"{what} has indices outside [0, {n})")
    mask[arr] = True
    return mask


def comparisons(
    obs: pd.DataFrame | None,
    n_cells: int,
    groupby: str | None = None,
    group1=None,
    group2=None,
    idx1=None,
    idx2=None,
) -> list[tuple[str | None, str | None, np.ndarray, np.ndarray]]:
    """The ``(group1, group2, mask1, mask2)`` comparisons scvi-tools' ``_de_core`` runs.

    With ``idx1`` the groups are anonymous (names None): cells in ``idx1`` against those in
    ``idx2`` (a cell in both counts in ``idx2``, as in scvi-tools) or against all others.
    Otherwise each ``group1`` category of ``obs[groupby]`` (default: all) against
    ``group2`` or against the rest.
    """
    if idx1 is not None:
        m1 = _mask_of(idx1, obs, n_cells, "idx1")
        if idx2 is not None:
            m2 = _mask_of(idx2, obs, n_cells, "idx2")
            m1 = m1 & ~m2
        else:
            m2 = ~m1
        if not m1.any() or not m2.any():
            raise ValueError("One of idx1 or idx2 has size zero.")
        return [(None, None, m1, m2)]
    if groupby is None:
        raise ValueError("pass groupby (an obs column) with group1/group2, or idx1/idx2")
    if obs is None:
        raise ValueError(f"groupby={groupby!r} needs an obs table; this data has none (a CSR "
                         "store?): select cells with idx1/idx2 instead")
    if groupby not in obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs; available: "
                       f"{list(obs.columns)[:20]}")
    col = obs[groupby].astype(str).to_numpy()
    if group1 is None:
        # the categories cells have (a categorical column's unused ones are no group)
        used = pd.Categorical(obs[groupby]).remove_unused_categories().categories
        group1 = [str(c) for c in used]
        if len(group1) == 1:
            raise ValueError("Only a single group in the data. Can't run DE on a single group.")
    if isinstance(group1, str) or not isinstance(group1, Iterable):
        group1 = [group1]
    present = set(col)
    for g in list(group1) + ([group2] if group2 is not None else []):
        if str(g) not in present:
            raise ValueError(f"group {g!r} is not a value of obs[{groupby!r}]: {sorted(present)[:20]}")
    out = []
    for g1 in group1:
        m1 = col == str(g1)
        m2 = ~m1 if group2 is None else col == str(group2)
        out.append((str(g1), "Rest" if group2 is None else str(group2), m1, m2))
    return out


# ------------------------------------------------------------------- driver --
def differential_expression(
    module,
    iter_batches: Callable[[np.ndarray], Iterable],
    n_cells: int,
    var_names: Sequence[str],
    obs: pd.DataFrame | None = None,
    groupby: str | None = None,
    group1=None,
    group2=None,
    idx1=None,
    idx2=None,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    all_stats: bool = True,
    batch_codes1: Sequence[int] | None = None,
    batch_codes2: Sequence[int] | None = None,
    fdr_target: float = 0.05,
    silent: bool = False,
    n_samples_overall: int = 5000,
    use_permutation: bool = False,
    m_permutation: int = 10000,
    change_fn: str | Callable | None = None,
    m1_domain_fn: Callable | None = None,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    test_mode: Literal["two", "three"] = "three",
    cred_interval_lvls: Sequence[float] | None = None,
    filter_outlier_cells: bool = False,
    representation_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Differential expression between cell groups, scvi-tools' ``differential_expression``.

    Parameters
    ----------
    module
        A trained :class:`~scvi_fast.module.VAE` (in eval mode, on its device).
    iter_batches
        ``iter_batches(rows)`` yields ``(host_minibatch, device_minibatch)`` pairs for the
        given source rows, in that order (``SCVI._iter`` with ``indices=rows``).
    n_cells, var_names
        Size of the data and gene names (the result's index).
    obs
        The cells' annotations (``adata.obs``) for ``groupby`` and query strings.
    batch_codes1, batch_codes2
        Batch codes to decode group 1 / group 2 in (scvi-tools' ``batch_correction=True``
        with ``batchid1`` / ``batchid2`` made codes by the caller); None: each cell's own batch.
    seed
        Seeds the choice of posterior samples and the ``z`` noise; None draws fresh
        randomness.

    Other parameters are scvi-tools'; see :meth:`scvi_fast.SCVI.differential_expression`.

    Returns
    -------
    A DataFrame indexed by gene name, one block of rows per comparison, sorted within each
    block by ``proba_de`` (change) or ``bayes_factor`` (vanilla).
    """
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change'; got {mode!r}")
    if n_samples_overall is None or n_samples_overall < 1:
        raise ValueError(f"n_samples_overall must be a positive integer; got {n_samples_overall}")
    var_names = pd.Index([str(v) for v in var_names])
    rng, generator = _random(seed, next(module.parameters()).device)
    sampler = _GroupSampler(module, iter_batches, n_samples_overall, rng, generator,
                            representation_fn if filter_outlier_cells else None)
    codes = ([None] if batch_codes1 is None else list(batch_codes1),
             [None] if batch_codes2 is None else list(batch_codes2))
    stats = dict(mode=mode, delta=delta, pseudocounts=pseudocounts, test_mode=test_mode,
                 change_fn=change_fn, m1_domain_fn=m1_domain_fn,
                 cred_interval_lvls=cred_interval_lvls)
    groups = comparisons(obs, n_cells, groupby, group1, group2, idx1, idx2)
    it = groups
    if not silent and len(groups) > 1:
        from tqdm.auto import tqdm

        it = tqdm(groups, desc="DE...")
    results = []
    for g1, g2, m1, m2 in it:
        s1, s2 = sampler.paired(m1, m2, codes, use_permutation, m_permutation)
        raw = None
        if all_stats or (mode == "change" and pseudocounts is None):
            union = np.flatnonzero(m1 | m2)
            raw = raw_counts_properties((mb for mb, _ in iter_batches(union)), len(var_names),
                                        [m1, m2])
        res = _de_table(s1, s2, raw, var_names, all_stats, threshold_counts, fdr_target, stats)
        if g1 is not None:
            res["comparison"] = f"{g1} vs {g2}"
            res["group1"] = g1
            res["group2"] = g2
        results.append(res)
    return pd.concat(results, axis=0)


def _random(seed: int | None, device) -> tuple[np.random.Generator, torch.Generator | None]:
    """The numpy generator of the sample choice and the torch generator of the ``z`` noise."""
    rng = np.random.default_rng(seed)
    if seed is None:
        return rng, None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng.integers(0, 2**62)))
    return rng, generator


class _GroupSampler:
    """Posterior samples of ``rho`` for the cells of a group, in the batches asked for."""

    def __init__(self, module, iter_batches, n_samples_overall, rng, generator,
                 representation_fn=None):
        self.module, self.iter_batches = module, iter_batches
        self.n_samples_overall, self.rng, self.generator = n_samples_overall, rng, generator
        self.representation_fn = representation_fn

    def rows(self, mask: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(mask)
        if self.representation_fn is not None:
            rows = _filter_outliers(rows, self.representation_fn)
        return rows

    def scales(self, rows: np.ndarray, codes: list[int | None]) -> list[np.ndarray]:
        """``n_samples_overall`` samples split evenly over ``codes`` (one part per code)."""
        n_each = int(self.n_samples_overall / len(codes))
        if n_each == 0:
            warnings.warn("very small sample size, please consider increasing `n_samples`",
                          UserWarning, stacklevel=4)
            n_each = 2
        return [sample_scales(self.module, self.iter_batches(rows), len(rows), n_each, code,
                              self.rng, self.generator) for code in codes]

    def paired(self, m1, m2, codes, use_permutation: bool, m_permutation: int):
        """The two groups' samples, paired within a batch when both decode in the same ones."""
        ids1, ids2 = codes
        parts1, parts2 = self.scales(self.rows(m1), ids1), self.scales(self.rows(m2), ids2)
        rng = self.rng
        corrected = ids1 != [None]
        if corrected and set(ids1) == set(ids2):
            s1, s2 = [], []
            for code in ids1:
                a, b = parts1[ids1.index(code)], parts2[ids2.index(code)]
                if use_permutation:
                    n_pb = m_permutation // len(ids1)
                    a, b = a[rng.integers(0, len(a), n_pb)], b[rng.integers(0, len(b), n_pb)]
                s1.append(a)
                s2.append(b)
            return np.concatenate(s1), np.concatenate(s2)
        if corrected and set(ids1) & set(ids2):
            warnings.warn(
                "Batchids of cells groups 1 and 2 are different but have an non-null "
                "intersection. Specific handling of such situations is not implemented yet "
                "and batch correction is not trustworthy.", UserWarning, stacklevel=3,
            )
        s1, s2 = np.concatenate(parts1), np.concatenate(parts2)
        if use_permutation:
            s1 = s1[rng.integers(0, len(s1), m_permutation)]
            s2 = s2[rng.integers(0, len(s2), m_permutation)]
        return s1, s2


def _de_table(scales_1, scales_2, raw, var_names, all_stats, threshold_counts, fdr_target,
              stats: dict) -> pd.DataFrame:
    """One comparison's table: Bayes factors (and raw statistics), sorted as scvi-tools."""
    mode = stats["mode"]
    info = bayes_factors(
        scales_1, scales_2,
        where_zero_1=None if raw is None else raw[0]["raw_mean"] < threshold_counts,
        where_zero_2=None if raw is None else raw[1]["raw_mean"] < threshold_counts,
        **stats,
    )
    if all_stats:
        for k in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
            info[f"{k}1"], info[f"{k}2"] = raw[0][k], raw[1][k]
    res = pd.DataFrame(info, index=var_names)
    res = res.sort_values(by="proba_de" if mode == "change" else "bayes_factor", ascending=False)
    if mode == "change":
        res[f"is_de_fdr_{fdr_target}"] = fdr_de_prediction(res["proba_de"], fdr=fdr_target)
    return res


def _filter_outliers(rows: np.ndarray, representation_fn) -> np.ndarray:
    """Drop cells the EllipticEnvelope calls outliers in the latent space (scvi-tools)."""
    if representation_fn is None:
        raise ValueError("filter_outlier_cells=True needs a representation_fn")
    try:
        from sklearn.covariance import EllipticEnvelope
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError(
            "filter_outlier_cells=True uses scikit-learn's EllipticEnvelope: "
            "pip install 'scvi_fast[metrics]' (or scikit-learn)"
        ) from err
    reps = representation_fn(rows)
    try:
        keep = EllipticEnvelope().fit_predict(reps) == 1
    except ValueError:
        warnings.warn("Could not properly estimate Cov!, using all samples", UserWarning, stacklevel=3)
        return rows
    return rows[keep]
