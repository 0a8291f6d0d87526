"""Integration metrics of an embedding: biological conservation and batch correction.

The metrics of the CZ CELLxGENE Census model benchmarks, computed as scib computes them:

============================  =====  ==============================================================
metric                        kind   definition
============================  =====  ==============================================================
``leiden_nmi``                bio    NMI (arithmetic) of labels vs Leiden clusters; resolutions
                                     0.1, 0.2, ..., 2.0 on the 15-NN UMAP graph, best NMI kept
``leiden_ari``                bio    ARI of labels vs the clustering that maximised NMI
``silhouette_label``          bio    ``(ASW(labels) + 1) / 2``
``label_<clf>``               bio    held-out accuracy predicting labels (60/40 split)
``silhouette_batch``          batch  per label: mean over its cells of ``1 - |s_batch|``; averaged
                                     over labels (labels seen in one batch only are skipped)
``batch_entropy``             batch  mean over cells of the entropy (nats) of batch frequencies
                                     among the cell's k nearest neighbours (k = 50, self excluded)
``batch_<clf>``               batch  ``1 - accuracy`` predicting the batch (60/40 split)
============================  =====  ==============================================================

``<clf>`` is ``svm`` (linear SVM), ``random_forest`` and ``logistic_regression``. Higher is
better for every metric. The field's libraries are optional extras (``pip install
'scvi_fast[metrics]'``): scikit-learn, igraph + leidenalg, umap-learn and matplotlib (for
the figure), each imported only when a metric needs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: scib's resolution sweep: 0.1, 0.2, ..., 2.0
LEIDEN_RESOLUTIONS = tuple(round(2 * x / 20, 2) for x in range(1, 21))
BIO = ("leiden_nmi", "leiden_ari", "silhouette_label", "label_svm", "label_random_forest",
       "label_logistic_regression")
BATCH = ("silhouette_batch", "batch_entropy", "batch_svm", "batch_random_forest",
         "batch_logistic_regression")


def _require(module: str, pip_name: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs {pip_name}: pip install 'scvi_fast[metrics]' (or pip install {pip_name})"
        ) from err


def _codes(values) -> tuple[np.ndarray, np.ndarray]:
    cats, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
    return codes.reshape(-1), cats


def _check(X, *columns) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64 if np.asarray(X).dtype == np.float64 else np.float32)
    if X.ndim != 2:
        raise ValueError(f"the embedding must be 2-D (cells x dims); got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("the embedding has NaN or infinite values")
    for c in columns:
        if c is not None and len(c) != X.shape[0]:
            raise ValueError(f"{len(c)} annotations for {X.shape[0]} cells")
    return X


# ---------------------------------------------------------------- neighbours --
def knn(X, n_neighbors: int = 15, include_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k nearest neighbours ``(indices, distances)``, each ``(n, k)``.

    With ``include_self`` the cell itself is the first neighbour (scanpy's convention).
    """
    neighbors = _require("sklearn.neighbors", "scikit-learn", "nearest neighbours")
    X = _check(X)
    n = X.shape[0]
    k = min(n_neighbors - 1 if include_self else n_neighbors, n - 1)
    # kneighbors() without a query excludes each cell from its own neighbours, even with
    # duplicated rows; the cell is then put first by hand
    dist, idx = neighbors.NearestNeighbors(n_neighbors=k).fit(X).kneighbors()
    if include_self:
        idx = np.concatenate([np.arange(n)[:, None], idx], axis=1)
        dist = np.concatenate([np.zeros((n, 1), dtype=dist.dtype), dist], axis=1)
    return idx, dist


def umap_connectivities(knn_indices: np.ndarray, knn_dists: np.ndarray, n_iter: int = 64) -> sp.csr_matrix:
    """UMAP's fuzzy simplicial set on a kNN graph, as ``scanpy.pp.neighbors`` builds it.

    Per cell ``i``: ``rho_i`` = distance to the nearest other cell, ``sigma_i`` solves
    ``sum_{j != i} exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(k)`` (bisection), with a floor of
    ``1e-3`` times the mean distance; ``w_ij = exp(-max(d_ij - rho_i, 0) / sigma_i)``; then
    the fuzzy union ``W + W^T - W o W^T``. The first column of ``knn_indices`` is the cell.
    """
    n, k = knn_indices.shape
    d = knn_dists.astype(np.float64)
    target = np.log2(k)
    others = d[:, 1:]
    rho = np.where(others.shape[1] > 0, np.where(others > 0, others, np.inf).min(1), 0.0)
    rho = np.where(np.isfinite(rho), rho, 0.0)
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    mid = np.ones(n)
    active = np.ones(n, dtype=bool)
    for _ in range(n_iter):
        psum = np.exp(-np.maximum(others - rho[:, None], 0.0) / mid[:, None]).sum(1)
        active &= np.abs(psum - target) >= 1e-5  # a row stops once within tolerance
        if not active.any():
            break
        too_big = active & (psum > target)
        too_small = active & ~(psum > target)
        hi = np.where(too_big, mid, hi)
        lo = np.where(too_small, mid, lo)
        new_mid = np.where(np.isinf(hi), mid * 2, (lo + hi) / 2)
        mid = np.where(active, new_mid, mid)
    floor = np.where(rho > 0, 1e-3 * d.mean(1), 1e-3 * d.mean())
    sigma = np.maximum(mid, floor)
    w = np.exp(-np.maximum(d - rho[:, None], 0.0) / sigma[:, None])
    w[knn_indices == np.arange(n)[:, None]] = 0.0
    W = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), knn_indices.ravel())), shape=(n, n))
    W.eliminate_zeros()
    Wt = W.T.tocsr()
    return (W + Wt - W.multiply(Wt)).tocsr()


def leiden(connectivities: sp.spmatrix, resolution: float = 1.0, seed: int = 0,
           n_iterations: int = -1) -> np.ndarray:
    """Leiden clusters (leidenalg RBConfiguration, weighted, directed).

    The settings of ``scanpy.tl.leiden`` with its default ``flavor="leidenalg"``, which
    iterates until the partition is stable (``n_iterations=-1``); a small positive number
    (2, scanpy's future default) is several times faster on large graphs.
    """
    ig = _require("igraph", "igraph", "Leiden clustering")
    la = _require("leidenalg", "leidenalg", "Leiden clustering")
    A = sp.coo_matrix(connectivities)
    g = ig.Graph(n=A.shape[0], edges=np.column_stack([A.row, A.col]).tolist(), directed=True)
    g.es["weight"] = A.data.astype(np.float64).tolist()
    part = la.find_partition(
        g, la.RBConfigurationVertexPartition, weights=np.asarray(g.es["weight"], dtype=np.float64),
        resolution_parameter=resolution, n_iterations=n_iterations, seed=seed,
    )
    return np.asarray(part.membership, dtype=np.int64)


# ------------------------------------------------------------------- bio --
def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information, arithmetic normalisation (scib's default)."""
    m = _require("sklearn.metrics", "scikit-learn", "NMI")
    return float(m.normalized_mutual_info_score(np.asarray(labels_true).astype(str),
                                                np.asarray(labels_pred).astype(str),
                                                average_method="arithmetic"))


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index."""
    m = _require("sklearn.metrics", "scikit-learn", "ARI")
    return float(m.adjusted_rand_score(np.asarray(labels_true).astype(str), np.asarray(labels_pred).astype(str)))


def leiden_nmi_ari(
    X,
    labels,
    resolutions: Sequence[float] = LEIDEN_RESOLUTIONS,
    n_neighbors: int = 15,
    seed: int = 0,
    connectivities: sp.spmatrix | None = None,
    n_iterations: int = -1,
) -> dict:
    """Leiden clusterings over ``resolutions``; the best NMI and the ARI of that clustering.

    Returns ``{"leiden_nmi", "leiden_ari", "resolution", "n_clusters"}``.
    """
    X = _check(X, labels)
    if connectivities is None:
        connectivities = umap_connectivities(*knn(X, n_neighbors))
    best = None
    for res in resolutions:
        cl = leiden(connectivities, res, seed, n_iterations)
        score = nmi(labels, cl)
        if best is None or score > best[0]:
            best = (score, res, cl)
    score, res, cl = best
    return {"leiden_nmi": score, "leiden_ari": ari(labels, cl), "resolution": float(res),
            "n_clusters": int(cl.max() + 1)}


def leiden_nmi(X, labels, **kwargs) -> float:
    """Best NMI of labels vs Leiden clusters over a resolution sweep (scib)."""
    return leiden_nmi_ari(X, labels, **kwargs)["leiden_nmi"]


def leiden_ari(X, labels, **kwargs) -> float:
    """ARI of labels vs the Leiden clustering with the best NMI (scib)."""
    return leiden_nmi_ari(X, labels, **kwargs)["leiden_ari"]


def silhouette_label(X, labels, scale: bool = True) -> float:
    """Average silhouette width of the labels; ``(asw + 1) / 2`` when ``scale`` (scib)."""
    m = _require("sklearn.metrics", "scikit-learn", "silhouette_label")
    X = _check(X, labels)
    asw = float(m.silhouette_score(X, np.asarray(labels).astype(str), metric="euclidean"))
    return (asw + 1) / 2 if scale else asw


def silhouette_batch(X, batch, labels, scale: bool = True, return_per_label: bool = False):
    """Batch ASW within each label, ``1 - |s|`` per cell, averaged per label then over labels.

    As ``scib.metrics.silhouette_batch``: labels present in a single batch, or with one cell
    per batch, are skipped. ``scale=False`` averages ``|s|`` instead (lower is better).
    """
    m = _require("sklearn.metrics", "scikit-learn", "silhouette_batch")
    X = _check(X, batch, labels)
    batch = np.asarray(batch).astype(str)
    labels = np.asarray(labels).astype(str)
    per_label = {}
    for lab in pd.unique(labels):
        sel = labels == lab
        n_b = len(np.unique(batch[sel]))
        if n_b == 1 or n_b == int(sel.sum()):
            continue
        s = np.abs(m.silhouette_samples(X[sel], batch[sel], metric="euclidean"))
        per_label[lab] = float(np.mean(1 - s if scale else s))
    if not per_label:
        raise ValueError("silhouette_batch: no label is seen in more than one batch")
    score = float(np.mean(list(per_label.values())))
    return (score, pd.Series(per_label, name="silhouette_batch")) if return_per_label else score


def batch_entropy(X=None, batch=None, n_neighbors: int = 50, knn_indices: np.ndarray | None = None) -> float:
    """Mean over cells of the Shannon entropy (nats) of batches among the k nearest neighbours.

    ``H_i = -sum_b p_ib log p_ib`` with ``p_ib`` the fraction of the cell's ``k`` neighbours
    (itself excluded) in batch ``b``; 0 when no batch mixes, ``log(n_batches)`` at best.
    Give ``knn_indices`` (``(n, k)``, self excluded) to reuse a graph.
    """
    codes, cats = _codes(batch)
    if knn_indices is None:
        X = _check(X, batch)
        knn_indices, _ = knn(X, n_neighbors, include_self=False)
    nb = codes[np.asarray(knn_indices)]
    counts = np.zeros((nb.shape[0], len(cats)))
    np.add.at(counts, (np.repeat(np.arange(nb.shape[0]), nb.shape[1]), nb.ravel()), 1.0)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return float(h.mean())


def classifier_scores(X, y, test_size: float = 0.4, seed: int = 0,
                      classifiers: Sequence[str] = ("svm", "random_forest", "logistic_regression")) -> dict:
    """Held-out accuracy of linear SVM / random forest / logistic regression predicting ``y``.

    A stratified 60/40 train/test split (plain when a class has a single cell), features
    standardised on the training part; scikit-learn defaults otherwise.
    """
    ms = _require("sklearn.model_selection", "scikit-learn", "classifier metrics")
    pre = _require("sklearn.preprocessing", "scikit-learn", "classifier metrics")
    X = _check(X, y)
    y = np.asarray(y).astype(str)
    _, counts = np.unique(y, return_counts=True)
    strat = y if counts.min() >= 2 else None
    X_tr, X_te, y_tr, y_te = ms.train_test_split(X, y, test_size=test_size, random_state=seed, stratify=strat)
    scaler = pre.StandardScaler().fit(X_tr)
    X_tr, X_te = scaler.transform(X_tr), scaler.transform(X_te)
    out = {}
    for name in classifiers:
        if name == "svm":
            from sklearn.svm import LinearSVC

            clf = LinearSVC(random_state=seed)
        elif name == "random_forest":
            from sklearn.ensemble import RandomForestClassifier

            clf = RandomForestClassifier(random_state=seed, n_jobs=1)
        elif name == "logistic_regression":
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(max_iter=1000, random_state=seed)
        else:
            raise ValueError(f"unknown classifier {name!r}; choose svm, random_forest, logistic_regression")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings of the linear models
            clf.fit(X_tr, y_tr)
        out[name] = float(np.mean(clf.predict(X_te) == y_te))
    return out


# ------------------------------------------------------------------ summary --
def evaluate(
    X,
    labels,
    batch,
    n_neighbors: int = 15,
    entropy_neighbors: int = 50,
    resolutions: Sequence[float] = LEIDEN_RESOLUTIONS,
    max_cells: int | None = None,
    seed: int = 0,
    leiden_iterations: int = -1,
) -> pd.Series:
    """Every metric of the module on one embedding: a Series indexed by metric name.

    ``max_cells`` evaluates a random subset of that many cells (silhouettes are quadratic in
    the number of cells); ``leiden_iterations`` is passed to :func:`leiden`. Also records
    ``leiden_resolution`` and ``leiden_n_clusters``.
    """
    X = _check(X, labels, batch)
    labels = np.asarray(labels).astype(str)
    batch = np.asarray(batch).astype(str)
    if max_cells is not None and X.shape[0] > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], max_cells, replace=False))
        X, labels, batch = X[keep], labels[keep], batch[keep]
    idx, dist = knn(X, max(n_neighbors, entropy_neighbors + 1))
    conn = umap_connectivities(idx[:, :n_neighbors], dist[:, :n_neighbors])
    cl = leiden_nmi_ari(X, labels, resolutions=resolutions, seed=seed, connectivities=conn,
                        n_iterations=leiden_iterations)
    out = {
        "leiden_nmi": cl["leiden_nmi"],
        "leiden_ari": cl["leiden_ari"],
        "silhouette_label": silhouette_label(X, labels),
    }
    out.update({f"label_{k}": v for k, v in classifier_scores(X, labels, seed=seed).items()})
    out["silhouette_batch"] = silhouette_batch(X, batch, labels)
    out["batch_entropy"] = batch_entropy(batch=batch, knn_indices=idx[:, 1 : entropy_neighbors + 1])
    out.update({f"batch_{k}": 1.0 - v for k, v in classifier_scores(X, batch, seed=seed).items()})
    out["leiden_resolution"] = cl["resolution"]
    out["leiden_n_clusters"] = cl["n_clusters"]
    return pd.Series(out, name="value")


def summary_table(embeddings: Mapping[str, np.ndarray], labels, batch, **kwargs) -> pd.DataFrame:
    """Metrics of several embeddings side by side: rows = metrics, one column per embedding.

    A ``kind`` column says ``bio`` or ``batch`` (``info`` for the Leiden resolution and
    cluster count); ``bio_mean`` and ``batch_mean`` rows average each kind.
    """
    cols = {name: evaluate(X, labels, batch, **kwargs) for name, X in embeddings.items()}
    table = pd.DataFrame(cols)
    table.loc["bio_mean"] = table.loc[list(BIO)].mean()
    table.loc["batch_mean"] = table.loc[list(BATCH)].mean()
    kind = {m: "bio" for m in BIO} | {m: "batch" for m in BATCH}
    kind |= {"bio_mean": "bio", "batch_mean": "batch"}
    order = [*BIO, "bio_mean", *BATCH, "batch_mean"]
    table = table.loc[order + [m for m in table.index if m not in order]]
    table.insert(0, "kind", [kind.get(m, "info") for m in table.index])
    table.index.name = "metric"
    return table


def umap_embedding(X, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """2-D UMAP of an embedding (umap-learn)."""
    umap = _require("umap", "umap-learn", "the UMAP figure")
    return umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1).fit_transform(_check(X))


def plot_summary(
    embeddings: Mapping[str, np.ndarray],
    labels,
    batch,
    table: pd.DataFrame,
    path: str | Path,
    max_points: int = 20000,
    seed: int = 0,
    reduce=None,
) -> Path:
    """A PNG: per embedding, UMAPs coloured by label and by batch; then the metric bars.

    ``reduce`` maps an embedding to 2-D coordinates (default: :func:`umap_embedding`).
    """
    mpl = _require("matplotlib", "matplotlib", "the figure")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels).astype(str)
    batch = np.asarray(batch).astype(str)
    n = len(labels)
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    names = list(embeddings)
    fig = plt.figure(figsize=(4.2 * max(2, len(names)) + 1, 8.5 + 3.5))
    gs = fig.add_gridspec(3, len(names), height_ratios=[1, 1, 0.9])
    for j, name in enumerate(names):
        emb = np.asarray(embeddings[name])[keep]
        xy = umap_embedding(emb, seed=seed) if reduce is None else np.asarray(reduce(emb))
        for i, (values, title) in enumerate(((labels[keep], "label"), (batch[keep], "batch"))):
            ax = fig.add_subplot(gs[i, j])
            cats = np.unique(values)
            cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
            for c_i, c in enumerate(cats):
                sel = values == c
                ax.scatter(xy[sel, 0], xy[sel, 1], s=1.5, color=cmap(c_i % cmap.N), label=c, rasterized=True)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {title}", fontsize=10)
            if j == len(names) - 1 and len(cats) <= 20:
                ax.legend(markerscale=5, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax = fig.add_subplot(gs[2, :])
    metrics = [m for m in table.index if table.loc[m, "kind"] in ("bio", "batch")]
    width = 0.8 / max(1, len(names))
    x = np.arange(len(metrics))
    for j, name in enumerate(names):
        ax.bar(x + j * width - 0.4 + width / 2, table.loc[metrics, name].astype(float), width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, max(1.0, float(np.nanmax(table.loc[metrics, names].to_numpy(dtype=float))) * 1.05))
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize=8, ncol=len(names))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "BATCH",
    "BIO",
    "LEIDEN_RESOLUTIONS",
    "ari",
    "batch_entropy",
    "classifier_scores",
    "evaluate",
    "knn",
    "leiden",
    "leiden_ari",
    "leiden_nmi",
    "leiden_nmi_ari",
    "nmi",
    "plot_summary",
    "silhouette_batch",
    "silhouette_label",
    "summary_table",
    "umap_connectivities",
    "umap_embedding",
]
