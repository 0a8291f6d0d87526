"""scvi-tools models with categorical and continuous covariates in and out of scvi_fast.

Oracle: ``tests/fixtures/scvi_tools_models/cov_enc_deep/model.pt`` and ``scvi_cov_enc_deep.npz``
(``make_scvi_covariate_fixtures.py``, scvi-tools 1.4.2): batch ``donor``, categorical
covariates ``cell_type`` (8) and ``phase`` (3), continuous ``log_counts`` and ``score``,
``encode_covariates=True``, ``deeply_inject_covariates=True``, 2 layers; ``cov_zinb_lenc`` the
same with ZINB, ``dispersion="gene-batch"`` and the library encoder, whose first layer reads the
covariates too.
"""

from __future__ import annotations

import os

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import scvi_fast
from scvi_fast.compat import safe_load_checkpoint
from tests.helpers import FIXTURES, load_fixture

MODELS = FIXTURES / "scvi_tools_models"
FOLDER = MODELS / "cov_enc_deep"
NAMES = ["enc_deep", "zinb_lenc"]


def _adata(name: str = "enc_deep"):
    arrays, cfg = load_fixture(f"cov_{name}")
    idx = arrays["cell_index"]
    obs = pd.DataFrame(index=[f"c{i}" for i in idx])
    obs["donor"] = arrays["obs/donor"][idx]
    for k in cfg["categorical_covariate_keys"]:
        obs[k] = arrays[f"obs/{k}"][idx]
    for k in cfg["continuous_covariate_keys"]:
        obs[k] = arrays[f"obs/{k}"][idx]
    adata = anndata.AnnData(X=arrays["x"].astype(np.float32), obs=obs,
                            var=pd.DataFrame(index=list(cfg["gene_names"])))
    return adata, arrays, cfg


def test_loads_with_its_covariate_setup():
    model = scvi_fast.SCVI.load(FOLDER)
    _, cfg = load_fixture("cov_enc_deep")
    reg = model.registry
    assert reg.categorical_covariate_keys == tuple(cfg["categorical_covariate_keys"])
    assert reg.categorical_covariate_categories == tuple(
        tuple(cfg["categorical_covariate_categories"][k]) for k in cfg["categorical_covariate_keys"])
    assert reg.continuous_covariate_keys == tuple(cfg["continuous_covariate_keys"])
    assert model.init_params_["encode_covariates"] and model.init_params_["deeply_inject_covariates"]
    first = model.module.encoder.first
    assert first.weight_cov.shape == (8 + 8 + 3, 32) and first.weight_cont.shape == (2, 32)


def test_loads_the_library_encoder_with_its_covariate_columns():
    model = scvi_fast.SCVI.load(MODELS / "cov_zinb_lenc")
    assert {k: model.init_params_[k] for k in ("gene_likelihood", "dispersion",
                                               "use_observed_lib_size")} == {
        "gene_likelihood": "zinb", "dispersion": "gene-batch", "use_observed_lib_size": False}
    first, z_first = model.module.l_encoder.first, model.module.encoder.first
    assert first.weight_cov.shape == z_first.weight_cov.shape == (8 + 8 + 3, 32)
    assert first.weight_cont.shape == z_first.weight_cont.shape == (2, 32)
    assert model.module.px_r.shape == (200, 8) and model.module.library_log_means.shape == (1, 8)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", ["torch", "native"])
def test_embeds_as_scvi_tools(impl, name):
    """Latent means equal scvi-tools' to float32 rounding (rtol 2e-5: two float32 evaluations of
    the same function in different operation orders, as in test_scvi_tools_checkpoint)."""
    from scvi_fast import functional

    if impl == "native" and not functional._is_available("native"):
        pytest.skip("the native extension is not built")
    adata, arrays, _ = _adata(name)
    model = scvi_fast.SCVI.load(MODELS / f"cov_{name}", adata=adata, impl=impl)
    np.testing.assert_allclose(model.get_latent_representation(), arrays["latent_mean"],
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_preserves_every_tensor_bitwise(tmp_path, name):
    folder = MODELS / f"cov_{name}"
    model = scvi_fast.SCVI.load(folder)
    model.save(tmp_path / "out", format="scvi-tools")
    theirs = safe_load_checkpoint(folder / "model.pt")
    ours = safe_load_checkpoint(tmp_path / "out" / "model.pt")
    a = {k: v for k, v in theirs["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    b = {k: v for k, v in ours["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ra, rb = theirs["attr_dict"]["registry_"], ours["attr_dict"]["registry_"]
    assert ra["setup_args"] == rb["setup_args"]
    sa = ra["field_registries"]["extra_categorical_covs"]["state_registry"]
    sb = rb["field_registries"]["extra_categorical_covs"]["state_registry"]
    assert sa["field_keys"] == sb["field_keys"] and sa["n_cats_per_key"] == sb["n_cats_per_key"]
    for k in sa["mappings"]:
        assert list(sa["mappings"][k]) == list(sb["mappings"][k])
    assert list(ra["field_registries"]["extra_continuous_covs"]["state_registry"]["columns"]) == \
        list(rb["field_registries"]["extra_continuous_covs"]["state_registry"]["columns"])
    assert ours["attr_dict"]["init_params_"] == theirs["attr_dict"]["init_params_"]
    again = scvi_fast.SCVI.load(tmp_path / "out")
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, again.module.state_dict()[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_native_format_round_trip_keeps_the_covariates(tmp_path, name):
    adata, _, _ = _adata(name)
    model = scvi_fast.SCVI.load(MODELS / f"cov_{name}", adata=adata)
    z = model.get_latent_representation()
    model.save(tmp_path / "native")
    again = scvi_fast.SCVI.load(tmp_path / "native", adata=adata)
    assert again.registry == model.registry and again.init_params_ == model.init_params_
    np.testing.assert_array_equal(again.get_latent_representation(), z)


@pytest.mark.parametrize("name", NAMES)
def test_exported_model_trained_here_has_library_encoder_of_the_right_width(tmp_path, name):
    folder = MODELS / f"cov_{name}"
    model = scvi_fast.SCVI.load(folder)
    model.passthrough = {}
    model.save(tmp_path / "out", format="scvi-tools")
    ref = safe_load_checkpoint(folder / "model.pt")["model_state_dict"]
    got = safe_load_checkpoint(tmp_path / "out" / "model.pt")["model_state_dict"]
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert got[k].shape == v.shape, k


def _rewrite(edit, dst):
    ckpt = torch.load(FOLDER / "model.pt", weights_only=False)
    edit(ckpt)
    os.makedirs(dst, exist_ok=True)
    torch.save(ckpt, os.path.join(dst, "model.pt"))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["attr_dict"]["registry_"]["setup_args"].update(
        continuous_covariate_keys=["log_counts"]), "continuous covariate columns"),
    (lambda c: c["attr_dict"]["registry_"]["setup_args"].update(
        categorical_covariate_keys=["cell_type", "nope"]), "no categories"),
    (lambda c: c["attr_dict"]["init_params_"]["kwargs"]["kwargs"].update(
        encode_covariates=False), "encode_covariates=False"),
])
def test_setups_that_do_not_fit_the_weights_are_refused(tmp_path, edit, match):
    _rewrite(edit, tmp_path / "m")
    with pytest.raises(ValueError, match=match):
        scvi_fast.SCVI.load(tmp_path / "m")
