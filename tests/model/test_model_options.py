"""The model options through ``SCVI``: defaults (ZINB as scvi-tools, NB for the Census preset),
native save / load of every option, and models saved before the options existed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import scvi_fast
from scvi_fast.data import synthetic_anndata

OPTIONS = ("gene_likelihood", "dispersion", "latent_distribution", "use_observed_lib_size")


@pytest.fixture(scope="module")
def adata():
    ad = synthetic_anndata(n_cells=80, n_genes=20, n_batches=2, n_cell_types=3, density=0.4,
                           seed=2)
    ad = ad[np.asarray(ad.X.sum(axis=1)).ravel() > 0].copy()
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch", labels_key="cell_type")
    return ad


def test_defaults_follow_scvi_tools_and_the_census_preset(adata):
    model = scvi_fast.SCVI(adata, n_hidden=8)
    assert {k: model.init_params_[k] for k in OPTIONS} == {
        "gene_likelihood": "zinb", "dispersion": "gene", "latent_distribution": "normal",
        "use_observed_lib_size": True}
    assert model.module.px_dropout_decoder is not None and model.module.l_encoder is None
    census = scvi_fast.SCVI(adata, preset="census", n_hidden=8, n_latent=3, n_layers=1)
    assert census.init_params_["gene_likelihood"] == "nb"
    assert census.module.px_dropout_decoder is None
    zinb_census = scvi_fast.SCVI(adata, preset="census", gene_likelihood="zinb", n_hidden=8)
    assert zinb_census.init_params_["gene_likelihood"] == "zinb"
    with pytest.raises(ValueError, match="gene_likelihood must be one of"):
        scvi_fast.SCVI(adata, gene_likelihood="normal")
    with pytest.raises(ValueError, match="dispersion must be one of"):
        scvi_fast.SCVI(adata, dispersion="cell")


@pytest.mark.parametrize("options", [
    {"gene_likelihood": "poisson", "dispersion": "gene-label", "latent_distribution": "ln"},
    {"gene_likelihood": "zinb", "dispersion": "gene-cell", "use_observed_lib_size": False},
    {"gene_likelihood": "nb", "dispersion": "gene-batch", "use_observed_lib_size": False},
], ids=lambda o: o["gene_likelihood"])
def test_native_save_load_keeps_every_option(adata, tmp_path, options):
    model = scvi_fast.SCVI(adata, n_hidden=8, n_latent=3, **options)
    model.train(max_epochs=1, device="cpu", progress_bar=False)
    model.save(tmp_path / "m")
    loaded = scvi_fast.SCVI.load(tmp_path / "m", adata=adata)
    assert {k: loaded.init_params_[k] for k in OPTIONS} == {k: model.init_params_[k]
                                                             for k in OPTIONS}
    want = model.module.state_dict()
    assert list(loaded.module.state_dict()) == list(want)
    for k, v in loaded.module.state_dict().items():
        assert torch.equal(v, want[k]), k
    np.testing.assert_array_equal(loaded.get_latent_representation(return_dist=True)[0],
                                  model.get_latent_representation(return_dist=True)[0])


def test_a_model_saved_before_the_options_loads_as_nb(adata, tmp_path):
    model = scvi_fast.SCVI(adata, n_hidden=8, n_latent=3, gene_likelihood="nb")
    model.save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    for k in OPTIONS:
        config["init_params"].pop(k)
    path.write_text(json.dumps(config))
    loaded = scvi_fast.SCVI.load(tmp_path / "m", adata=adata)
    assert loaded.init_params_["gene_likelihood"] == "nb"
    assert loaded.module.px_dropout_decoder is None
