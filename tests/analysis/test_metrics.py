"""Integration metrics against values computed by hand on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")

from scvi_fast import metrics  # noqa: E402
from scvi_fast.data import write_h5ad  # noqa: E402


def test_batch_entropy_by_hand():
    # 1-D points; k = 2 neighbours (self excluded):
    # cell0 {1,2} -> B,A: ln 2 | cell1 {0,2} -> A,A: 0 | cell2 {1,0} -> B,A: ln 2
    # cells 3,4,5 only see batch B: 0.  Mean = 2 ln 2 / 6.
    X = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    batch = ["A", "B", "A", "B", "B", "B"]
    assert metrics.batch_entropy(X, batch, n_neighbors=2) == pytest.approx(2 * math.log(2) / 6)
    # a given graph over batches a, b, c, a:
    # rows 0 and 3 see {a or b, c ...} all three batches -> ln 3; rows 1 and 2 see (2/3, 1/3)
    nbrs = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    got = metrics.batch_entropy(batch=["a", "b", "c", "a"], knn_indices=nbrs)
    assert got == pytest.approx((2 * math.log(3) + 2 * h) / 4)


def test_silhouette_label_by_hand():
    # points 0, 1 (label a) and 10, 11 (label b):
    # s(0) = 1 - 1/10.5, s(1) = 1 - 1/9.5, symmetric for b
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = ["a", "a", "b", "b"]
    asw = ((1 - 1 / 10.5) + (1 - 1 / 9.5)) / 2
    assert metrics.silhouette_label(X, labels, scale=False) == pytest.approx(asw)
    assert metrics.silhouette_label(X, labels) == pytest.approx((asw + 1) / 2)


def test_silhouette_batch_by_hand():
    # label L1: points 0,1,2,3 in batches x,y,x,y:
    #   s = 0, -0.5, -0.5, 0  ->  1 - |s| = 1, 0.5, 0.5, 1  ->  0.75
    # label L2: a single batch -> skipped; label L3: one cell per batch -> skipped
    X = np.array([[0.0], [1.0], [2.0], [3.0], [50.0], [51.0], [90.0], [95.0]])
    batch = ["x", "y", "x", "y", "x", "x", "x", "y"]
    labels = ["L1"] * 4 + ["L2"] * 2 + ["L3"] * 2
    score, per_label = metrics.silhouette_batch(X, batch, labels, return_per_label=True)
    assert score == pytest.approx(0.75)
    assert list(per_label.index) == ["L1"]
    assert metrics.silhouette_batch(X, batch, labels, scale=False) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="more than one batch"):
        metrics.silhouette_batch(X[4:6], batch[4:6], labels[4:6])


def test_nmi_ari_known_values():
    a = [0, 0, 1, 1]
    assert metrics.nmi(a, ["x", "x", "y", "y"]) == pytest.approx(1.0)
    assert metrics.ari(a, [5, 5, 3, 3]) == pytest.approx(1.0)
    # independent partitions: mutual information 0
    assert metrics.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # ARI of {0,0,1,1} vs {0,0,0,1}: index 1, expected 1/2, max 3/2 -> (1 - 0.5)/(1.5 - 0.5) = 0
    assert metrics.ari([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-12)


def test_knn_and_umap_connectivities_by_hand():
    X = np.array([[0.0], [1.0], [3.0]])
    idx, dist = metrics.knn(X, 2)  # self + 1 neighbour
    np.testing.assert_array_equal(idx, [[0, 1], [1, 0], [2, 1]])
    np.testing.assert_allclose(dist, [[0, 1], [0, 1], [0, 2]])
    # one other neighbour: rho is its distance, so every edge weighs exp(0) = 1
    C = metrics.umap_connectivities(idx, dist).toarray()
    np.testing.assert_allclose(C, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    # duplicated rows: a cell is still its own first neighbour
    idx2, _ = metrics.knn(np.zeros((4, 2)), 3)
    np.testing.assert_array_equal(idx2[:, 0], np.arange(4))


def test_umap_connectivities_calibration():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 4))
    idx, dist = metrics.knn(X, 10)
    C = metrics.umap_connectivities(idx, dist)
    assert abs(C - C.T).max() < 1e-12 and C.diagonal().max() == 0
    assert C.max() <= 1 + 1e-12 and C.min() >= 0
    # the nearest neighbour is at distance rho, so its weight is 1 in both directions
    # union: 1 + w - 1 * w = 1
    np.testing.assert_allclose(C.toarray()[np.arange(60), idx[:, 1]], 1.0)


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]], dtype=float)
    labels = np.repeat(["t0", "t1", "t2"], 60)
    batch = np.tile(["b0", "b1"], 90)
    X = centers[np.repeat([0, 1, 2], 60)] + rng.normal(size=(180, 4))
    return X, labels, batch


def test_leiden_recovers_separated_blobs(blobs):
    pytest.importorskip("leidenalg")
    X, labels, _ = blobs
    res = metrics.leiden_nmi_ari(X, labels, resolutions=(0.1, 0.5, 1.0))
    assert res["leiden_nmi"] == pytest.approx(1.0) and res["leiden_ari"] == pytest.approx(1.0)
    assert res["n_clusters"] == 3


def test_classifiers_and_summary_table(blobs, tmp_path):
    pytest.importorskip("leidenalg")
    X, labels, batch = blobs
    acc = metrics.classifier_scores(X, labels)
    assert acc == {"svm": 1.0, "random_forest": 1.0, "logistic_regression": 1.0}
    rng = np.random.default_rng(1)
    table = metrics.summary_table(
        {"good": X, "noise": rng.normal(size=X.shape)}, labels, batch, resolutions=(0.5, 1.0)
    )
    assert list(table.columns) == ["kind", "good", "noise"]
    for m in metrics.BIO + metrics.BATCH + ("bio_mean", "batch_mean"):
        assert m in table.index
    assert table.loc["leiden_nmi", "good"] == pytest.approx(1.0)
    assert table.loc["leiden_nmi", "good"] > table.loc["leiden_nmi", "noise"]
    # batch is random within blobs: near-perfect mixing (entropy close to ln 2)
    assert table.loc["batch_entropy", "good"] > 0.6
    assert 0.0 <= table.loc["batch_svm", "good"] <= 1.0
    assert set(table["kind"]) == {"bio", "batch", "info"}
    pytest.importorskip("matplotlib")
    png = metrics.plot_summary({"good": X, "noise": X[::-1]}, labels, batch, table[["kind", "good", "noise"]],
                               tmp_path / "m.png", reduce=lambda e: e[:, :2])
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        metrics.silhouette_label(np.zeros(5), list("aabbb"))
    with pytest.raises(ValueError, match="annotations"):
        metrics.silhouette_label(np.zeros((5, 2)), list("aab"))
    with pytest.raises(ValueError, match="NaN"):
        metrics.silhouette_label(np.full((4, 2), np.nan), list("aabb"))


def test_cli_evaluate_h5ad(blobs, tmp_path, capsys):
    pytest.importorskip("leidenalg")
    anndata = pytest.importorskip("anndata")
    from scvi_fast.cli import main

    X, labels, batch = blobs
    adata = anndata.AnnData(np.zeros((len(labels), 2), dtype=np.float32))
    adata.obs["cell_type"] = labels
    adata.obs["donor"] = batch
    adata.obsm["X_emb"] = X
    write_h5ad(adata, tmp_path / "a.h5ad")
    rc = main(["evaluate", str(tmp_path / "a.h5ad"), "--label-key", "cell_type", "--batch-key", "donor",
               "--embedding-key", "X_emb", "--out", str(tmp_path / "ev"), "--no-plot"])
    assert rc == 0
    table = pd.read_csv(tmp_path / "ev" / "metrics.csv", index_col=0)
    assert table.loc["leiden_nmi", "X_emb"] == pytest.approx(1.0)
    assert "batch_entropy" in capsys.readouterr().out
    # a missing key is a clear error, not a traceback
    rc = main(["evaluate", str(tmp_path / "a.h5ad"), "--label-key", "nope", "--batch-key", "donor",
               "--embedding-key", "X_emb", "--out", str(tmp_path / "ev2"), "--no-plot"])
    assert rc == 2 and "nope" in capsys.readouterr().err
