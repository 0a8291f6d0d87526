"""Differential expression, batch-corrected expression and posterior predictive samples
on a small real data set: Kang et al. 2018 PBMCs, control vs IFN-beta stimulated."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvi_fast
from scvi_fast.analysis import normalized_expression
from tests.helpers import shared_file

ISG = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "ISG20"]
CHANGE_COLUMNS = [
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
    "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max",
]
VANILLA_COLUMNS = ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
RAW_COLUMNS = [
    "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
    "raw_normalized_mean1", "raw_normalized_mean2",
]
GROUP_COLUMNS = ["comparison", "group1", "group2"]


@pytest.fixture(scope="module")
def kang():
    adata = anndata.read_h5ad(shared_file("kang_ctrlstim_muscat_example.h5ad"))
    scvi_fast.SCVI.setup_anndata(adata, batch_key="donor")
    # a quick model: 50 epochs of 6 minibatches (batch 256, lr 4e-3)
    model = scvi_fast.SCVI(adata, gene_likelihood="nb")
    model.train(max_epochs=50, batch_size=256, lr=4e-3, seed=0, progress_bar=False)
    return adata, model


@pytest.fixture(scope="module")
def de_change(kang):
    _, model = kang
    return model.differential_expression(
        groupby="condition", group1="stim", group2="ctrl", mode="change", seed=0, silent=True
    )


def test_change_mode_recovers_interferon_genes(kang, de_change):
    adata, _ = kang
    de = de_change
    present = [g for g in ISG if g in adata.var_names]
    assert len(present) == 6
    assert list(de.columns) == CHANGE_COLUMNS + RAW_COLUMNS + ["is_de_fdr_0.05"] + GROUP_COLUMNS
    assert de.index.is_unique and set(de.index) == set(adata.var_names)
    assert (de["comparison"] == "stim vs ctrl").all()
    ranks = {g: int(np.flatnonzero(de.index == g)[0]) + 1 for g in present}
    # Observed over training seeds 0-2 and DE seeds 0-1 (1267 genes): every ISG ranks 1-15,
    # with LFC 3.5-7 (stim over ctrl). (With scvi-tools' defaults, 100 epochs give the same;
    # after only 40, IFIT3 is still over-predicted in ctrl cells and drops to rank ~250.)
    assert max(ranks.values()) <= 25, ranks
    assert (de.loc[present, "lfc_mean"] > 2.5).all()
    assert (de.loc[present, "proba_de"] > 0.95).all()
    assert de.loc[present, "is_de_fdr_0.05"].all()
    print("ISG ranks (change mode, stim vs ctrl):", ranks)
    # sorted by proba_de; the FDR calls are a prefix of that order
    assert de["proba_de"].is_monotonic_decreasing
    calls = de["is_de_fdr_0.05"].to_numpy()
    assert not (np.diff(calls.astype(int)) > 0).any()
    # raw statistics against a direct computation
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    stim = (adata.obs["condition"] == "stim").to_numpy()
    g = adata.var_names.get_loc("ISG15")
    assert de.loc["ISG15", "raw_mean1"] == pytest.approx(X[stim, g].mean())
    assert de.loc["ISG15", "non_zeros_proportion2"] == pytest.approx((X[~stim, g] > 0).mean())
    norm = X / X.sum(1, keepdims=True) * 1e4
    assert de.loc["ISG15", "raw_normalized_mean2"] == pytest.approx(norm[~stim, g].mean(), rel=1e-5)


def test_vanilla_mode_and_selection_forms(kang):
    adata, model = kang
    de = model.differential_expression(groupby="condition", group1="stim", group2="ctrl",
                                       seed=0, n_samples=1000, silent=True)
    assert list(de.columns) == VANILLA_COLUMNS + RAW_COLUMNS + GROUP_COLUMNS
    assert de["bayes_factor"].is_monotonic_decreasing
    top = set(de.index[:30])
    assert sum(g in top for g in ISG) >= 5, [int(np.flatnonzero(de.index == g)[0]) + 1 for g in ISG]
    np.testing.assert_allclose(de["proba_m1"] + de["proba_m2"], 1.0)
    # idx1 / idx2 as a mask, indices or a query: anonymous groups, no comparison columns
    stim = (adata.obs["condition"] == "stim").to_numpy()
    for idx1, idx2 in ((stim, ~stim), (np.flatnonzero(stim), np.flatnonzero(~stim)),
                       ("condition == 'stim'", "condition == 'ctrl'")):
        d = model.differential_expression(idx1=idx1, idx2=idx2, mode="change", seed=1,
                                          n_samples=500, all_stats=False, silent=True)
        assert list(d.columns) == CHANGE_COLUMNS + ["is_de_fdr_0.05"]
    # same seed, same table
    d1 = model.differential_expression(idx1=stim, idx2=~stim, seed=3, n_samples=300, silent=True)
    d2 = model.differential_expression(idx1=stim, idx2=~stim, seed=3, n_samples=300, silent=True)
    pd.testing.assert_frame_equal(d1, d2)


def test_one_vs_rest_and_batch_correction(kang):
    adata, model = kang
    de = model.differential_expression(groupby="cell_type", mode="change", n_samples=300,
                                       seed=0, all_stats=False, silent=True)
    types = sorted(adata.obs["cell_type"].astype(str).unique())
    assert sorted(de["group1"].unique()) == types
    assert (de["group2"] == "Rest").all() and len(de) == len(types) * adata.n_vars
    assert set(de["comparison"]) == {f"{t} vs Rest" for t in types}
    bc = model.differential_expression(groupby="condition", group1="stim", group2="ctrl",
                                       batch_correction=True, n_samples=400, seed=0, silent=True)
    assert list(bc.columns) == VANILLA_COLUMNS + RAW_COLUMNS + GROUP_COLUMNS
    assert sum(g in set(bc.index[:40]) for g in ISG) >= 4
    with pytest.raises(ValueError, match="batch_correction"):
        model.differential_expression(groupby="condition", group1="stim", batchid1=["101"], silent=True)
    with pytest.raises(ValueError, match="not a value"):
        model.differential_expression(groupby="condition", group1="nope", silent=True)
    with pytest.raises(KeyError):
        model.differential_expression(groupby="no_such_column", silent=True)


def test_transform_batch_changes_only_the_decoding(kang):
    adata, model = kang
    module = model.module
    cats = model.batch_categories
    assert len(cats) == 2
    lat_before = model.get_latent_representation()
    # the decoder sees only (z, batch): one z decoded in one batch twice is identical,
    # in two batches it differs
    z = torch.as_tensor(lat_before[:1]).repeat(2, 1)
    with torch.inference_mode():
        same = module.decode_scale(z, torch.tensor([0, 0]))
        diff = module.decode_scale(z, torch.tensor([0, 1]))
    # (BLAS may round two identical rows differently in the last bit)
    torch.testing.assert_close(same[0], same[1], rtol=1e-5, atol=1e-9)
    assert ((diff[0] - diff[1]).abs() / diff[0]).max() > 1e-2

    idx = np.arange(200)

    def expr(tb, seed=0):
        torch.manual_seed(seed)
        return model.get_normalized_expression(indices=idx, transform_batch=tb, return_numpy=True)

    e0, e0_again, e1 = expr(cats[0]), expr(cats[0]), expr(cats[1])
    np.testing.assert_array_equal(e0, e0_again)
    assert np.abs(e0 - e1).max() > 1e-5
    # a list of batches averages them (same z draws)
    np.testing.assert_allclose(expr(list(cats)), (e0 + e1) / 2, rtol=1e-5, atol=1e-9)
    # cells of batch b decoded in their own batch == decoded in b
    own = np.flatnonzero((adata.obs["donor"].astype(str) == cats[1]).to_numpy())[:100]
    torch.manual_seed(1)
    a = model.get_normalized_expression(indices=own, return_numpy=True)
    torch.manual_seed(1)
    b = model.get_normalized_expression(indices=own, transform_batch=cats[1], return_numpy=True)
    np.testing.assert_array_equal(a, b)
    # the latent space does not depend on it
    np.testing.assert_array_equal(model.get_latent_representation(), lat_before)
    with pytest.raises(ValueError, match="not trained on: \\['no-such-donor'\\]"):
        model.get_normalized_expression(transform_batch="no-such-donor")
    # batches are named, never positions (an integer is the name it reads as)
    with pytest.raises(ValueError, match="not trained on: \\['1'\\]"):
        model.get_normalized_expression(indices=idx, transform_batch=1)
    np.testing.assert_array_equal(expr(int(cats[1])), e1)


def test_normalized_expression_chunking_is_exact(kang):
    _, model = kang
    idx = np.arange(64)
    kw = dict(transform_codes=[0, 1], gene_idx=np.array([5, 2, 7]), library_size="latent", n_samples=0)
    full, obs = normalized_expression(model.module, model._iter(None, idx, 64), 64, **kw)
    small, obs2 = normalized_expression(model.module, model._iter(None, idx, 10), 64, max_rows=3, **kw)
    np.testing.assert_allclose(small, full, rtol=1e-6)
    np.testing.assert_array_equal(obs, idx)
    np.testing.assert_array_equal(obs2, idx)
    out = model.get_normalized_expression(indices=idx[:5], n_samples=4, return_mean=False)
    assert out.shape == (4, 5, model.module.n_input) and out.dtype == np.float32


def test_posterior_predictive_sample(kang):
    adata, model = kang
    torch.manual_seed(0)
    x = model.posterior_predictive_sample(indices=np.arange(50))
    assert isinstance(x, sp.csr_array) and x.shape == (50, adata.n_vars) and x.dtype == np.float32
    d = x.todense()
    assert isinstance(d, np.ndarray) and (d >= 0).all() and np.array_equal(d, np.round(d))
    # the samples track the data: library sizes within a factor of ~2 on average
    lib_obs = np.asarray(adata.X[:50].sum(1)).ravel()
    ratio = d.sum(1) / lib_obs
    assert 0.5 < np.median(ratio) < 2.0
    genes = list(adata.var_names[[9, 3]])
    x3 = model.posterior_predictive_sample(indices=np.arange(20), n_samples=3, gene_list=genes)
    assert x3.shape == (20, 2, 3) and x3.dtype == np.float32
    d3 = x3.todense()
    assert (d3 >= 0).all() and np.array_equal(d3, np.round(d3))
    with pytest.raises(ValueError, match="gene_list"):
        model.posterior_predictive_sample(gene_list=["NOT_A_GENE"])
