"""Out-of-core highly variable gene selection, Seurat v3 flavour (as in scanpy)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from numba import njit

from ._open import as_source
from ._store import CSRStore


@njit(nogil=True, cache=True)
def _moments_inner(indptr, indices, data, codes, s1, s2, ncells):
    """Accumulate per-(batch, gene) sums and sums of squares, and cells per batch."""
    for i in range(indptr.shape[0] - 1):
        b = codes[i]
        ncells[b] += 1
        for k in range(indptr[i], indptr[i + 1]):
            v = np.float64(data[k])
            s1[b, indices[k]] += v
            s2[b, indices[k]] += v * v


@njit(nogil=True, cache=True)
def _clipped_inner(indptr, indices, data, codes, clip, s1, s2):
    """Per-(batch, gene) sums of ``min(x, clip)`` and its square over the non-zeros."""
    for i in range(indptr.shape[0] - 1):
        b = codes[i]
        for k in range(indptr[i], indptr[i + 1]):
            g = indices[k]
            v = min(np.float64(data[k]), clip[b, g])
            s1[b, g] += v
            s2[b, g] += v * v


@njit(nogil=True, cache=True)
def _loess_direct_inner(x_sorted, y_sorted, q, out):
    """Degree-2 local regression evaluated at every point (direct, tricube weights).

    For each point the ``q`` nearest neighbours form a contiguous window of the sorted ``x``;
    the window slides so that it always holds the ``q`` closest points.
    """
    n = x_sorted.shape[0]
    lo = 0
    for i in range(n):
        x0 = x_sorted[i]
        while lo + q < n and x0 - x_sorted[lo] > x_sorted[lo + q] - x0:
            lo += 1
        hi = lo + q
        dmax = max(x0 - x_sorted[lo], x_sorted[hi - 1] - x0)
        if dmax <= 0:
            dmax = 1.0
        # weighted normal equations for the local quadratic [1, d, d^2]; the fit at d = 0 is
        # its constant term, solved by Cramer's rule (3 x 3, symmetric)
        s0 = s1 = s2 = s3 = s4 = 0.0
        r0 = r1 = r2 = 0.0
        for j in range(lo, hi):
            d = x_sorted[j] - x0
            u = abs(d) / dmax
            w = (1.0 - u * u * u) ** 3 if u < 1.0 else 0.0
            d2 = d * d
            y = y_sorted[j]
            s0 += w
            s1 += w * d
            s2 += w * d2
            s3 += w * d2 * d
            s4 += w * d2 * d2
            r0 += w * y
            r1 += w * d * y
            r2 += w * d2 * y
        det = s0 * (s2 * s4 - s3 * s3) - s1 * (s1 * s4 - s3 * s2) + s2 * (s1 * s3 - s2 * s2)
        if abs(det) > 1e-12 * max(1.0, s0 * s2 * s4):
            out[i] = (r0 * (s2 * s4 - s3 * s3) - s1 * (r1 * s4 - s3 * r2)
                      + s2 * (r1 * s3 - s2 * r2)) / det
        else:  # degenerate neighbourhood (tied x): fall back to the weighted mean
            out[i] = r0 / s0 if s0 > 0 else y_sorted[i]


def _loess_fit(x: np.ndarray, y: np.ndarray, span: float, method: str) -> np.ndarray:
    if method in ("auto", "skmisc"):
        try:  # optional (scikit-misc, the hvg extra): imported only when asked for
            from skmisc.loess import loess
        except ImportError:
            if method == "skmisc":
                raise ImportError(
                    "loess='skmisc' needs scikit-misc: pip install scikit-misc"
                ) from None
        else:
            model = loess(x, y, span=span, degree=2)
            model.fit()
            return model.outputs.fitted_values
    order = np.argsort(x, kind="stable")
    q = max(3, min(x.size, int(np.floor(span * x.size))))
    fitted = np.empty(x.size)
    _loess_direct_inner(x[order].astype(np.float64), y[order].astype(np.float64), q, fitted)
    out = np.empty_like(fitted)
    out[order] = fitted
    return out


def _batch_codes_for(src, obj, batch_key):
    if batch_key is None:
        return np.zeros(src.n_cells, np.int64)
    store = obj if isinstance(obj, CSRStore) else getattr(src, "store", None)
    if store is not None:
        return store.obs_column(batch_key).codes.astype(np.int64)
    return src.batch_codes


def highly_variable_genes(store_or_adata, n_top_genes: int, batch_key: str | None = None,
                          layer: str | None = None, span: float = 0.3,
                          chunk_size: int = 16384,
                          loess: Literal["auto", "skmisc", "direct"] = "auto"):
    """Select highly variable genes, Seurat v3 flavour, streaming over the data twice.

    Matches ``scanpy.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=...,
    batch_key=...)`` on raw counts: per batch, a loess fit of log10 variance against log10
    mean gives the expected standard deviation, counts are clipped at ``mean + sqrt(N) * sd``,
    the standardised variance is ranked, and genes are ordered by their median rank over the
    batches where they are in the top ``n_top_genes`` (ties: more batches first).

    Parameters
    ----------
    store_or_adata
        A :class:`CSRStore`, a store path, an AnnData (in memory or backed), an ``.h5ad``
        path, or anything :func:`as_source` accepts. Memory is bounded by ``chunk_size`` cells
        plus a few (n_batches, n_genes) arrays.
    n_top_genes
        Number of genes to select.
    batch_key
        obs column (or the store's recorded batch / labels key) defining batches.
    layer
        AnnData layer holding counts.
    span
        Loess span (scanpy's default 0.3).
    chunk_size
        Cells per chunk.
    loess
        ``"skmisc"`` uses scikit-misc's loess (what scanpy uses, identical results);
        ``"direct"`` a built-in direct loess (results can differ from scanpy for genes near the
        cut-off); ``"auto"`` prefers scikit-misc when installed.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene name, with columns ``highly_variable``, ``highly_variable_rank``,
        ``highly_variable_nbatches``, ``means``, ``variances``, ``variances_norm``.
    """
    src = as_source(store_or_adata, layer=layer, batch_key=batch_key)
    codes = _batch_codes_for(src, store_or_adata, batch_key)
    n_b = int(codes.max()) + 1 if codes.size else 1
    g = src.n_genes
    s1 = np.zeros((n_b, g))
    s2 = np.zeros((n_b, g))
    nc = np.zeros(n_b, np.int64)
    for start, chunk in src.iter_chunks(chunk_size):
        _moments_inner(chunk.indptr.astype(np.int64), chunk.indices, chunk.data,
                       codes[start : start + chunk.shape[0]], s1, s2, nc)
    present = np.flatnonzero(nc > 0)
    n = nc[:, None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1)
    clip = np.zeros((n_b, g))
    reg_std = np.ones((n_b, g))
    for b in present:
        not_const = var[b] > 0
        est = np.zeros(g)
        est[not_const] = _loess_fit(np.log10(mean[b, not_const]), np.log10(var[b, not_const]),
                                    span, loess)
        reg_std[b] = np.sqrt(10**est)
        clip[b] = reg_std[b] * np.sqrt(nc[b]) + mean[b]
    c1 = np.zeros((n_b, g))
    c2 = np.zeros((n_b, g))
    for start, chunk in src.iter_chunks(chunk_size):
        _clipped_inner(chunk.indptr.astype(np.int64), chunk.indices, chunk.data,
                       codes[start : start + chunk.shape[0]], clip, c1, c2)
    norm_var = np.empty((present.size, g))
    for j, b in enumerate(present):
        nb = float(nc[b])
        norm_var[j] = (1.0 / ((nb - 1) * reg_std[b] ** 2)) * (
            nb * mean[b] ** 2 + c2[b] - 2 * c1[b] * mean[b]
        )
    ranked = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    n_batches_hv = np.sum(ranked < n_top_genes, axis=0)
    ranked[ranked >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    n_all = nc.sum()
    tot1, tot2 = s1.sum(axis=0), s2.sum(axis=0)
    means = tot1 / n_all
    variances = (tot2 - n_all * means**2) / (n_all - 1)
    df = pd.DataFrame({"means": means, "variances": variances,
                       "highly_variable_nbatches": n_batches_hv,
                       "highly_variable_rank": median_rank,
                       "variances_norm": norm_var.mean(axis=0)},
                      index=pd.Index(src.var_names))
    # scanpy sorts by (rank ascending, NaN last; n_batches descending), stably
    rank_key = np.where(np.isnan(median_rank), np.inf, median_rank)
    order = np.lexsort((-n_batches_hv, rank_key))
    hv = np.zeros(g, dtype=bool)
    hv[order[: int(n_top_genes)]] = True
    df["highly_variable"] = hv
    return df
