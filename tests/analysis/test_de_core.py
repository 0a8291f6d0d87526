"""DE statistics on hand-made inputs (no model): scvi-tools' formulas, value by value."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_fast.analysis import (
    bayes_factors,
    comparisons,
    credible_intervals,
    estimate_pseudocounts_offset,
    fdr_de_prediction,
    raw_counts_properties,
)

EPS = 1e-8


def test_fdr_de_prediction_by_hand():
    p = pd.Series([0.5, 0.99, 0.2, 0.9], index=list("abcd"))
    # sorted 0.99, 0.9, 0.5, 0.2: expected FDR 0.01, 0.055, 0.2033, 0.35
    got = fdr_de_prediction(p, fdr=0.05)
    assert list(got.index) == list("abcd")
    assert got.to_dict() == {"a": False, "b": True, "c": False, "d": False}
    assert fdr_de_prediction(p, fdr=0.06).sum() == 2
    assert fdr_de_prediction(p, fdr=0.3).sum() == 3


def test_pseudocounts_offset_by_hand():
    scales_a = np.array([[0.1, 0.2, 0.3, 0.4], [0.3, 0.1, 0.0, 0.5]])
    scales_b = np.array([[0.2, 0.2, 0.1, 0.1], [0.1, 0.6, 0.1, 0.1]])
    za = np.array([True, True, False, False])  # max_a = 0.3, 0.2 -> q90 = 0.29
    zb = np.array([False, False, True, False])  # max_b = 0.1 -> 0.1
    assert estimate_pseudocounts_offset(scales_a, scales_b, za, zb) == pytest.approx(0.29 / 4)
    none = np.zeros(4, dtype=bool)
    assert estimate_pseudocounts_offset(scales_a, scales_b, none, none) == pytest.approx(1e-10)


def test_vanilla_bayes_factor_by_hand():
    s1 = np.array([[2.0, 1.0, 1.0], [2.0, 3.0, 1.0]], dtype=np.float32)
    s2 = np.array([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]], dtype=np.float32)
    r = bayes_factors(s1, s2, mode="vanilla")
    assert list(r) == ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
    np.testing.assert_allclose(r["proba_m1"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(r["proba_m2"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(r["bayes_factor"], [math.log(1 + EPS) - math.log(EPS), 0.0,
                                                   math.log(EPS) - math.log(1 + EPS)])
    np.testing.assert_allclose(r["scale1"], [2.0, 2.0, 1.0])


def test_change_mode_by_hand():
    pc = 1e-4
    s1 = np.array([[0.4, 0.1], [0.2, 0.1], [0.1, 0.1], [0.05, 0.1]])
    s2 = np.full((4, 2), 0.1)
    r = bayes_factors(s1, s2, mode="change", delta=0.5, pseudocounts=pc)
    lfc = np.log2((s1[:, 0] + pc) / (0.1 + pc))  # ~ 2, 1, 0, -1
    p_plus, p_minus = np.mean(lfc >= 0.5), np.mean(lfc < -0.5)
    assert r["proba_de"][0] == pytest.approx(max(p_plus, p_minus)) == pytest.approx(0.5)
    assert r["proba_de"][1] == 0.0  # identical samples: lfc = 0
    two = bayes_factors(s1, s2, mode="change", delta=0.5, pseudocounts=pc, test_mode="two")
    assert two["proba_de"][0] == pytest.approx(0.75)
    # LFC summaries use 1e-3 * pseudocounts
    lfc_small = np.log2((s1[:, 0] + 1e-3 * pc) / (0.1 + 1e-3 * pc))
    assert r["lfc_mean"][0] == pytest.approx(lfc_small.mean())
    assert r["lfc_median"][0] == pytest.approx(np.median(lfc_small))
    assert r["lfc_std"][0] == pytest.approx(lfc_small.std())
    assert r["lfc_max"][0] == pytest.approx(lfc_small.max())
    np.testing.assert_allclose(r["proba_not_de"], 1 - r["proba_de"])
    np.testing.assert_allclose(r["bayes_factor"], np.log(r["proba_de"] + EPS) - np.log(1 - r["proba_de"] + EPS))
    assert r["pseudocounts"] == pc and r["delta"] == 0.5
    # pseudocounts estimated from where-zero masks
    est = bayes_factors(s1, s2, mode="change", where_zero_1=np.array([False, True]),
                        where_zero_2=np.array([False, False]))
    assert est["pseudocounts"] == pytest.approx(0.1 / 2)
    with pytest.raises(ValueError, match="shape"):
        bayes_factors(s1[:3], s2, mode="change", pseudocounts=pc)


def test_credible_intervals_by_hand():
    x = np.array([[0.0], [1.0], [1.1], [1.2], [5.0]])
    # arviz's HPD (as scvi-tools): windows from sorted[i] to sorted[i + floor(level * n)]
    # level 0.4: spans of 2 steps -> 1.1, 0.2, 3.9 -> [1.0, 1.2]
    np.testing.assert_allclose(credible_intervals(x, 0.4), [[1.0, 1.2]])
    # level 0.6: spans of 3 steps -> 1.2, 4.0 -> [0.0, 1.2]
    np.testing.assert_allclose(credible_intervals(x, 0.6), [[0.0, 1.2]])


def test_comparisons_follow_scvi_tools():
    obs = pd.DataFrame({"g": ["a", "b", "c", "a", "b"]})
    comps = comparisons(obs, 5, groupby="g")
    assert [(c[0], c[1]) for c in comps] == [("a", "Rest"), ("b", "Rest"), ("c", "Rest")]
    np.testing.assert_array_equal(comps[0][2], [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(comps[0][3], [0, 1, 1, 0, 1])
    (g1, g2, m1, m2), = comparisons(obs, 5, groupby="g", group1="a", group2="b")
    np.testing.assert_array_equal(m2, [0, 1, 0, 0, 1])
    # idx1 and idx2 overlapping: a shared cell counts in group 2, as in scvi-tools
    (g1, g2, m1, m2), = comparisons(obs, 5, idx1=[0, 1, 2], idx2=[2, 3])
    assert g1 is None and g2 is None
    np.testing.assert_array_equal(m1, [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(m2, [0, 0, 1, 1, 0])
    (_, _, m1, m2), = comparisons(obs, 5, idx1="g == 'c'")
    np.testing.assert_array_equal(m1, [0, 0, 1, 0, 0])
    assert m2.sum() == 4
    with pytest.raises(ValueError, match="size zero"):
        comparisons(obs, 5, idx1=[0, 1], idx2=[0, 1])
    with pytest.raises(ValueError, match="single group"):
        comparisons(pd.DataFrame({"g": ["a"] * 3}), 3, groupby="g")
    with pytest.raises(ValueError, match="length"):
        comparisons(obs, 5, idx1=np.ones(4, dtype=bool))


def test_default_groups_are_the_categories_cells_have():
    """A categorical column's unused categories are no group (they used to be, and failed as
    "not a value"); the groups keep the category order."""
    obs = pd.DataFrame({"g": pd.Categorical(["b", "a", "b"], categories=["b", "none", "a"])})
    assert [c[0] for c in comparisons(obs, 3, groupby="g")] == ["b", "a"]
    with pytest.raises(ValueError, match="single group"):
        comparisons(obs.iloc[[0, 2]], 2, groupby="g")


def test_raw_counts_properties_against_dense():
    rng = np.random.default_rng(0)
    X = rng.poisson(0.7, size=(9, 6)).astype(np.float32)
    X[:, 0] += 1  # no empty cells
    order = np.array([4, 0, 8, 2, 7, 1, 3, 6, 5])

    def mb(rows):
        c = sp.csr_matrix(X[rows])
        return SimpleNamespace(indptr=c.indptr, indices=c.indices, values=c.data, obs_idx=rows,
                               library=X[rows].sum(1))

    m1 = np.zeros(9, dtype=bool)
    m1[[0, 2, 4]] = True
    m2 = np.zeros(9, dtype=bool)
    m2[[1, 5, 6, 8]] = True
    got = raw_counts_properties([mb(order[:4]), mb(order[4:])], 6, [m1, m2])
    norm = X / X.sum(1, keepdims=True) * 1e4
    for r, m in zip(got, (m1, m2)):
        np.testing.assert_allclose(r["raw_mean"], X[m].mean(0))
        np.testing.assert_allclose(r["non_zeros_proportion"], (X[m] != 0).mean(0))
        np.testing.assert_allclose(r["raw_normalized_mean"], norm[m].mean(0), rtol=1e-6)
