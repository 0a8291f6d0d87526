import itertools
import math

import numpy as np
import pytest

import bench_fidelity as bf


def test_permutation_p_counts_every_split():
    # a = [3, 4], b = [0, 1, 2]: of the C(5, 2) = 10 splits, |mean difference| >= 2.5 (the
    # observed one) only for {3, 4} vs the rest and {0, 1} vs the rest -> p = 2 / 10
    assert bf.permutation_p([3.0, 4.0], [0.0, 1.0, 2.0]) == pytest.approx(0.2)
    # identical groups: every split is at least as extreme as a zero difference
    assert bf.permutation_p([1.0, 1.0], [1.0, 1.0]) == 1.0


def test_permutation_p_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=4), rng.normal(0.5, size=3)
    pooled, obs = np.concatenate([a, b]), abs(a.mean() - b.mean())
    hits = [abs(pooled[list(i)].mean() - np.delete(pooled, list(i)).mean()) >= obs - 1e-12
            for i in itertools.combinations(range(7), 4)]
    assert bf.permutation_p(a, b) == pytest.approx(np.mean(hits))


def test_compare_welch_and_paired_against_scipy():
    rng = np.random.default_rng(1)
    from scipy import stats

    a, b = rng.normal(size=5), rng.normal(0.3, 2.0, size=4)
    pairs = list(zip(a[:4], b))
    c = bf.compare(a, b, pairs)
    assert c["mean_a"] == pytest.approx(a.mean()) and c["sd_b"] == pytest.approx(b.std(ddof=1))
    assert c["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert c["paired_n"] == 4
    assert c["paired_diff"] == pytest.approx(np.mean(a[:4] - b))
    assert c["paired_p"] == pytest.approx(stats.ttest_rel(a[:4], b).pvalue)
    # one run a side: means only, no tests
    one = bf.compare([1.0], [2.0])
    assert one["diff"] == -1.0 and math.isnan(one["welch_p"]) and math.isnan(one["paired_p"])
