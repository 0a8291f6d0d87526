"""Differential expression of cell groups: which cells, their posterior samples, the table.

:func:`differential_expression` takes a module and a callable that iterates minibatches over
given rows, never the user-facing model class; the statistics are :mod:`._de`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ._de import bayes_factors, fdr_de_prediction
from ._expression import sample_scales
from ._importance import importance_sample


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
    weights: Literal["uniform", "importance"] | None = "uniform",
    importance_weighting_kwargs: dict | None = None,
) -> pd.DataFrame:
    """Differential expression between cell groups, scvi-tools' ``differential_expression``.

    ``module`` is a trained :class:`~scvi_fast.module.VAE` (eval mode, on its device);
    ``iter_batches(rows)`` yields ``(host_minibatch, device_minibatch)`` pairs for the given
    source rows, in that order; ``n_cells`` and ``var_names`` (the result's index) describe the
    data, ``obs`` its annotations (for ``groupby`` and query strings). ``batch_codes1`` /
    ``batch_codes2``: the batch codes to decode each group in (scvi-tools'
    ``batch_correction=True``, with ``batchid1`` / ``batchid2`` made codes by the caller);
    None: each cell's own batch. ``seed`` seeds the choice of posterior samples and the ``z``
    noise (None: fresh randomness). ``weights="importance"`` draws each group's samples with
    scvi-tools' importance weights (:func:`~scvi_fast.analysis.importance_sample`, options in
    ``importance_weighting_kwargs``). Other parameters are scvi-tools'; see
    :meth:`scvi_fast.SCVI.differential_expression`.

    Returns a DataFrame indexed by gene name, one block of rows per comparison, sorted within
    each block by ``proba_de`` (change) or ``bayes_factor`` (vanilla).
    """
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change'; got {mode!r}")
    if n_samples_overall is None or n_samples_overall < 1:
        raise ValueError(f"n_samples_overall must be a positive integer; got {n_samples_overall}")
    var_names = pd.Index([str(v) for v in var_names])
    rng, generator = _random(seed, next(module.parameters()).device)
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance'; got {weights!r}")
    sampler = _GroupSampler(module, iter_batches, n_samples_overall, rng, generator,
                            representation_fn if filter_outlier_cells else None,
                            importance_weighting_kwargs if weights == "importance" else None)
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
    need_raw = all_stats or (mode == "change" and pseudocounts is None)
    results = []
    for g1, g2, m1, m2 in it:
        s1, s2 = sampler.paired(m1, m2, codes, use_permutation, m_permutation)
        raw = None
        if need_raw:
            union = np.flatnonzero(m1 | m2)
            raw = raw_counts_properties((mb for mb, _ in iter_batches(union)), len(var_names),
                                        [m1, m2])
        res = _de_table(s1, s2, raw, var_names, all_stats, threshold_counts, fdr_target, stats)
        if g1 is not None:
            res["comparison"], res["group1"], res["group2"] = f"{g1} vs {g2}", g1, g2
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
                 representation_fn=None, importance: dict | None = None):
        self.module, self.iter_batches = module, iter_batches
        self.n_samples_overall, self.rng, self.generator = n_samples_overall, rng, generator
        self.representation_fn = representation_fn
        self.importance = importance  # None: uniform weights; else importance_sample options

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
        if self.importance is not None:
            return [importance_sample(self.module, self.iter_batches, rows, n_each, code,
                                      self.rng, self.generator, **self.importance)
                    for code in codes]
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
