"""SCVI with extra covariates: setup, minibatches, training, save/load, refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import scvi_fast
from scvi_fast.data import CSRLoader, synthetic_anndata

TRAIN = dict(max_epochs=2, batch_size=64, progress_bar=False, device="cpu")
COVS = dict(categorical_covariate_keys=["site", "phase"], continuous_covariate_keys=["pct", "age"])


@pytest.fixture
def adata():
    ad = synthetic_anndata(n_cells=240, n_genes=60, n_batches=3, n_cell_types=3, seed=3)
    ad = ad[np.asarray(ad.X.sum(1)).ravel() > 0].copy()
    rng = np.random.default_rng(0)
    ad.obs["site"] = pd.Categorical(rng.choice(["a", "b", "c", "d"], ad.n_obs))
    ad.obs["phase"] = rng.choice(["G1", "S"], ad.n_obs)  # plain strings: categorised
    ad.obs["pct"] = rng.uniform(0, 1, ad.n_obs)
    ad.obs["age"] = rng.integers(20, 80, ad.n_obs)
    ad.obs["sf"] = rng.uniform(0.5, 2, ad.n_obs)
    return ad


def test_setup_records_categories_and_minibatches_carry_covariates(adata):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf", **COVS)
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4, encode_covariates=True)
    reg = model.registry
    assert reg.categorical_covariate_categories == (("a", "b", "c", "d"), ("G1", "S"))
    assert reg.continuous_covariate_keys == ("pct", "age") and reg.size_factor_key == "sf"
    src = model._source()
    seen = 0
    for mb in CSRLoader(src, batch_size=50, shuffle=True, seed=1):
        obs = adata.obs.iloc[mb.obs_idx]
        np.testing.assert_array_equal(
            mb.cat_covs, np.stack([obs["site"].cat.codes, pd.Categorical(
                obs["phase"], categories=["G1", "S"]).codes], 1))
        np.testing.assert_array_equal(mb.cont_covs, obs[["pct", "age"]].to_numpy(np.float32))
        np.testing.assert_array_equal(mb.size_factor, obs["sf"].to_numpy(np.float32))
        t = mb.to("cpu")
        assert t.cat_covs.dtype == torch.int64 and t.cont_covs.shape == (mb.n_cells, 2)
        seen += mb.n_cells
    assert seen == adata.n_obs
    # the setup survives in adata.uns: a model made from it later has the same registry
    assert scvi_fast.SCVI(adata, n_hidden=16, n_latent=4).registry == reg


@pytest.mark.parametrize("encode, deep", [(True, True), (False, False)])
def test_train_save_load_embeds_identically(adata, tmp_path, encode, deep):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", **COVS)
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4, n_layers=2, encode_covariates=encode,
                           deeply_inject_covariates=deep)
    first = model.module.encoder.first
    assert (first.weight_cov is not None) == encode and (first.weight_cont is not None) == encode
    assert (model.module.decoder.linears[1].weight_cov is not None) == deep
    model.train(**TRAIN)
    assert np.isfinite(model.history_["elbo_train"]).all()
    z = model.get_latent_representation()
    model.save(tmp_path / "m")
    loaded = scvi_fast.SCVI.load(tmp_path / "m", adata=adata)
    assert loaded.init_params_["encode_covariates"] == encode
    assert loaded.registry == model.registry
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    # the covariates change the decoder's output
    rho = model.get_normalized_expression(return_numpy=True)
    other = adata.copy()
    other.obs["pct"] = other.obs["pct"] + 1.0
    assert not np.allclose(model.get_normalized_expression(other, return_numpy=True), rho)


@pytest.mark.parametrize("size_factor", [False, True], ids=["observed", "size_factor"])
def test_zinb_library_encoder_with_covariates_trains_and_round_trips(adata, tmp_path,
                                                                     size_factor):
    """ZINB, per-batch dispersion and the library encoder with categorical and continuous
    covariates, encoded: the library encoder reads the same covariate columns as the z
    encoder; training is finite; the native format and the scvi-tools format give back every
    tensor bit for bit and the same latent representation. With size factors the rate reads
    them and the library encoder adds only its KL."""
    from scvi_fast.compat import safe_load_checkpoint

    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch",
                                 size_factor_key="sf" if size_factor else None, **COVS)
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4, n_layers=2, gene_likelihood="zinb",
                           dispersion="gene-batch", use_observed_lib_size=False,
                           encode_covariates=True)
    vae = model.module
    lfirst, zfirst = vae.l_encoder.first, vae.encoder.first
    # 3 batch + 4 site + 2 phase one-hot columns, 2 continuous
    assert lfirst.weight_cov.shape == zfirst.weight_cov.shape == (3 + 4 + 2, 16)
    assert lfirst.weight_cont.shape == zfirst.weight_cont.shape == (2, 16)
    before = {k: v.clone() for k, v in vae.state_dict().items() if "l_encoder.first.weight_co" in k}
    model.train(**TRAIN)
    assert np.isfinite(model.history_["elbo_train"]).all() and np.isfinite(model.get_elbo())
    for k, v in before.items():  # the library encoder's covariate columns trained
        assert not torch.equal(v, vae.state_dict()[k]), k
    z = model.get_latent_representation()
    model.save(tmp_path / "native")
    native = scvi_fast.SCVI.load(tmp_path / "native", adata=adata)
    model.save(tmp_path / "st", format="scvi-tools")
    st = scvi_fast.SCVI.load(tmp_path / "st", adata=adata)
    for again in (native, st):
        assert {k: again.init_params_[k] for k in ("gene_likelihood", "dispersion",
                                                    "use_observed_lib_size",
                                                    "encode_covariates")} == {
            "gene_likelihood": "zinb", "dispersion": "gene-batch",
            "use_observed_lib_size": False, "encode_covariates": True}
        assert again.registry == model.registry
        assert again.module.use_size_factor_key == size_factor
        for k, v in vae.state_dict().items():
            assert torch.equal(v, again.module.state_dict()[k]), k
        np.testing.assert_array_equal(again.get_latent_representation(), z)
    # scvi-tools' layout: the library encoder's first layer is [genes, cont, one-hots]
    state = safe_load_checkpoint(tmp_path / "st" / "model.pt")["model_state_dict"]
    assert state["l_encoder.encoder.fc_layers.Layer 0.0.weight"].shape == (16, 60 + 2 + 9)
    assert state["px_r"].shape == (60, 3)
    st.save(tmp_path / "st2", format="scvi-tools")
    state2 = safe_load_checkpoint(tmp_path / "st2" / "model.pt")["model_state_dict"]
    assert list(state) == list(state2)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state2[k]), k


def test_size_factor_training_is_finite(adata):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf")
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4)
    assert model.module.use_size_factor_key
    model.train(**TRAIN)
    assert np.isfinite(model.get_elbo())


def test_bad_covariates_are_refused(adata):
    with pytest.raises(KeyError, match="categorical_covariate_keys='nope'"):
        scvi_fast.SCVI.setup_anndata(adata, categorical_covariate_keys=["nope"])
    with pytest.raises(TypeError, match="a list of obs columns"):
        scvi_fast.SCVI.setup_anndata(adata, categorical_covariate_keys="site")
    adata.obs["txt"] = "x"
    with pytest.raises(TypeError, match="must be numeric"):
        scvi_fast.SCVI.setup_anndata(adata, continuous_covariate_keys=["txt"])
    adata.obs["bad"] = adata.obs["pct"].to_numpy().copy()
    adata.obs.iloc[5, adata.obs.columns.get_loc("bad")] = np.nan
    with pytest.raises(ValueError, match="missing or infinite"):
        scvi_fast.SCVI.setup_anndata(adata, continuous_covariate_keys=["bad"])
    adata.obs["neg"] = -adata.obs["sf"]
    with pytest.raises(ValueError, match="size factors <= 0"):
        scvi_fast.SCVI.setup_anndata(adata, size_factor_key="neg")


def test_unknown_category_at_inference_is_refused(adata):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", **COVS)
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4)
    other = adata.copy()
    other.obs["site"] = other.obs["site"].cat.add_categories("zz")
    other.obs.iloc[0, other.obs.columns.get_loc("site")] = "zz"
    with pytest.raises(ValueError, match="categories the model was not trained on: \\['zz'\\]"):
        model.get_latent_representation(other)


def test_store_is_refused_for_a_model_with_covariates(adata, tmp_path):
    from scvi_fast.data import CSRStore

    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", **COVS)
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4)
    store = CSRStore.create(tmp_path / "s", adata, batch_key="batch")
    with pytest.raises(ValueError, match="a CSR store does not record"):
        model.get_latent_representation(store)


def test_query_mapping_extends_every_covariate_block(adata):
    """New batch and covariate categories get new rows at the end of their own block of every
    stacked table; the reference's rows stay in place; only one-hot rows train by default."""
    ref_cells = (adata.obs["batch"] != adata.obs["batch"].cat.categories[-1]).to_numpy() & (
        adata.obs["site"] != "d").to_numpy()
    ref_data = adata[ref_cells].copy()
    ref_data.obs["site"] = ref_data.obs["site"].cat.remove_unused_categories()
    scvi_fast.SCVI.setup_anndata(ref_data, batch_key="batch", **COVS)
    ref = scvi_fast.SCVI(ref_data, n_hidden=16, n_latent=4, n_layers=2, encode_covariates=True)
    ref.train(**TRAIN)
    assert ref.module.n_batch == 2 and ref.module.n_cats_per_cov == (3, 2)
    query = adata[~ref_cells].copy()
    model = scvi_fast.SCVI.load_query_data(query, ref)
    assert model.module.n_batch == 3 and model.module.n_cats_per_cov == (4, 2)
    assert model.registry.categorical_covariate_categories[0] == ("a", "b", "c", "d")
    ref_state, state = ref.module.state_dict(), model.module.state_dict()
    for key, table in state.items():
        if key.endswith("weight_cov"):
            old = ref_state[key]
            # blocks: batch 2 -> 3 rows, site 3 -> 4 rows, phase 2 rows
            torch.testing.assert_close(table[0:2], old[0:2], rtol=0, atol=0)
            torch.testing.assert_close(table[3:6], old[2:5], rtol=0, atol=0)
            torch.testing.assert_close(table[7:9], old[5:7], rtol=0, atol=0)
            assert table.shape[0] == 9
    before = {k: v.clone() for k, v in state.items()}
    model.train(max_epochs=2, batch_size=32, progress_bar=False, device="cpu",
                plan_kwargs={"weight_decay": 0.0})
    after = model.module.state_dict()
    assert not torch.equal(after["decoder.linears.0.weight_cov"], before["decoder.linears.0.weight_cov"])
    for key in ("decoder.linears.0.weight", "decoder.linears.0.weight_cont",
                "encoder.first.weight_cont", "encoder.first.weight"):
        assert torch.equal(after[key], before[key]), key
    assert np.isfinite(model.get_latent_representation()).all()


def test_covariate_setup_survives_an_h5ad_round_trip(adata, tmp_path):
    import anndata

    from scvi_fast.data import write_h5ad
    from scvi_fast.model import Registry

    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf", **COVS)
    write_h5ad(adata, tmp_path / "a.h5ad")
    back = anndata.read_h5ad(tmp_path / "a.h5ad")
    assert Registry.from_anndata(back) == Registry.from_anndata(adata)


def test_view_anndata_setup_lists_covariate_categories(adata, capsys):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", **COVS)
    scvi_fast.SCVI(adata, n_hidden=16, n_latent=4).view_anndata_setup()
    out = capsys.readouterr().out
    assert "extra_categorical_covs State Registry (adata.obs['site'])" in out
    assert "n_extra_continuous_covs    2" in out
