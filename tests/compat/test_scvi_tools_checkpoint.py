"""scvi-tools model folders in and out of scvi_fast, and refusal of unsafe or unsupported files.

Oracle: ``tests/fixtures/scvi_tools_models/{default,nobatch}/model.pt``, written by
scvi-tools 1.4.2 itself (see tests/fixtures/README.md), and the ``latent_mean``
scvi-tools computed with the same weights (``scvi_<name>.npz``).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import scvi_fast
from scvi_fast.compat import (
    UnsafeCheckpointError,
    read_scvi_tools_folder,
    safe_load_checkpoint,
    save_scvi_tools,
    unused_scvi_tools_heads,
)
from scvi_fast.data import write_h5ad
from scvi_fast.model import Registry
from tests.helpers import FIXTURES, load_fixture

MODELS = ["default", "nobatch"]


def _folder(name):
    return FIXTURES / "scvi_tools_models" / name


def _fixture_adata(name):
    arrays, cfg = load_fixture(name)
    obs = pd.DataFrame(index=[str(s) for s in arrays["obs_names"]])
    if cfg["batch_key"]:
        obs[cfg["batch_key"]] = pd.Categorical(
            np.asarray(cfg["batch_categories"])[arrays["batch_index"]], categories=cfg["batch_categories"]
        )
    adata = anndata.AnnData(X=arrays["x"].astype(np.float32), obs=obs,
                            var=pd.DataFrame(index=list(cfg["gene_names"])))
    return adata, arrays, cfg


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_preserves_every_tensor_bitwise(name, tmp_path):
    model = scvi_fast.SCVI.load(_folder(name))
    model.save(tmp_path / "out", format="scvi-tools")
    theirs = safe_load_checkpoint(_folder(name) / "model.pt")
    ours = safe_load_checkpoint(tmp_path / "out" / "model.pt")
    a = {k: v for k, v in theirs["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    b = {k: v for k, v in ours["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    assert list(np.asarray(theirs["var_names"])) == list(np.asarray(ours["var_names"]))
    reg_a, reg_b = theirs["attr_dict"]["registry_"], ours["attr_dict"]["registry_"]
    assert reg_a["setup_args"] == reg_b["setup_args"]
    for field in ("batch", "labels"):
        ma = reg_a["field_registries"][field]["state_registry"]["categorical_mapping"]
        mb = reg_b["field_registries"][field]["state_registry"]["categorical_mapping"]
        assert np.asarray(ma).dtype == np.asarray(mb).dtype and list(ma) == list(mb)
    assert ours["attr_dict"]["init_params_"]["non_kwargs"] == theirs["attr_dict"]["init_params_"]["non_kwargs"]
    # and back again: scvi_fast -> scvi-tools -> scvi_fast is the identity on the module
    again = scvi_fast.SCVI.load(tmp_path / "out")
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, again.module.state_dict()[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_loaded_model_matches_scvi_tools_latent(name):
    """Latent means from the loaded model.pt equal scvi-tools' to float32 rounding (state tolerance)."""
    adata, arrays, _ = _fixture_adata(name)
    model = scvi_fast.SCVI.load(_folder(name), adata=adata, impl="torch")
    assert model.is_trained
    latent = model.get_latent_representation()
    np.testing.assert_allclose(latent, arrays["latent_mean"], rtol=2e-5, atol=2e-6)


def test_registry_and_history_read(tmp_path):
    model = scvi_fast.SCVI.load(_folder("default"))
    _, cfg = load_fixture("default")
    assert model.registry.batch_key == "donor"
    assert model.batch_categories == [str(c) for c in cfg["batch_categories"]]
    assert list(model.var_names) == list(cfg["gene_names"])
    assert model.init_params_["n_hidden"] == cfg["n_hidden"]
    assert model.module.dropout_rate == pytest.approx(cfg["dropout_rate"])
    assert len(model.history_["elbo_train"]) == 5
    # the library encoder and the px_r / px_dropout heads, carried through unchanged
    heads = unused_scvi_tools_heads(1287, 128, 1, 8)
    assert set(model.passthrough) == set(heads)
    nobatch = scvi_fast.SCVI.load(_folder("nobatch"))
    assert nobatch.registry.batch_key is None and not nobatch.module.has_covariates


def test_model_trained_in_scvi_fast_exports_unused_heads(tmp_path):
    model = scvi_fast.SCVI.load(_folder("nobatch"))
    model.passthrough = {}
    save_scvi_tools(model, tmp_path)
    state = safe_load_checkpoint(tmp_path / "model.pt")["model_state_dict"]
    ref = safe_load_checkpoint(_folder("nobatch") / "model.pt")["model_state_dict"]
    assert list(state) == list(ref)
    for k in ref:
        if isinstance(ref[k], torch.Tensor):
            assert state[k].shape == ref[k].shape, k


# ------------------------------------------------------------------ refusals --
def _rewrite(src, dst, edit):
    """Copy an scvi-tools model.pt, changing its attr_dict with ``edit``."""
    ckpt = torch.load(src, weights_only=False)
    edit(ckpt)
    os.makedirs(dst, exist_ok=True)
    torch.save(ckpt, os.path.join(dst, "model.pt"))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(gene_likelihood="normal"), "gene_likelihood"),
        (lambda c: c["attr_dict"]["registry_"].update(model_name="SCANVI"), "SCANVI"),
    ],
)
def test_unsupported_configurations_are_refused(tmp_path, edit, match):
    _rewrite(_folder("nobatch") / "model.pt", tmp_path / "m", edit)
    with pytest.raises(NotImplementedError, match=match):
        scvi_fast.SCVI.load(tmp_path / "m")


@pytest.mark.parametrize("option, value, missing", [
    ("gene_likelihood", "zinb", "px_dropout_decoder"),
    ("use_observed_lib_size", False, "l_encoder"),
])
def test_options_that_the_weights_contradict_are_refused(tmp_path, option, value, missing):
    """Supported options whose tensors the file lacks (an NB file claiming ZINB...): a clear
    error naming the missing tensor, nothing loaded."""
    def edit(c):
        c["attr_dict"]["init_params_"]["non_kwargs"][option] = value
        c["model_state_dict"] = {k: v for k, v in c["model_state_dict"].items()
                                 if not k.startswith(("decoder.px_dropout", "l_encoder"))}
    _rewrite(_folder("nobatch") / "model.pt", tmp_path / "m", edit)
    with pytest.raises(ValueError, match=missing):
        scvi_fast.SCVI.load(tmp_path / "m")


class _Evil:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "builtins.open", "builtins.exec", "nested"])
def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, how):
    target = tmp_path / "pwned.txt"
    payload = {
        "os.system": _Evil(os.system, f"touch {target}"),
        "builtins.open": _Evil(open, str(target), "w"),
        "builtins.exec": _Evil(exec, f"open({str(target)!r}, 'w').write('x')"),
    }
    ckpt = torch.load(_folder("nobatch") / "model.pt", weights_only=False)
    if how == "nested":  # hidden deep inside the registry, after plenty of legitimate data
        ckpt["attr_dict"]["registry_"]["field_registries"]["batch"]["summary_stats"]["n"] = payload["os.system"]
    else:
        ckpt["attr_dict"]["history_"] = payload[how]
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save(ckpt, folder / "model.pt")
    name = {"os.system": "system", "builtins.open": "open", "builtins.exec": "exec", "nested": "system"}[how]
    with pytest.raises(UnsafeCheckpointError, match=rf"'\w+\.{name}'") as err:
        scvi_fast.SCVI.load(folder)
    assert "nothing was executed" in str(err.value)
    assert not target.exists()
    with pytest.raises(UnsafeCheckpointError):
        scvi_fast.SCVI.prepare_query_anndata(anndata.AnnData(np.ones((2, 2), np.float32)), folder)
    assert not target.exists()


def test_only_latin1_bytes_codec_is_allowed(tmp_path):
    """``_codecs.encode`` is allowed for protocol-2 bytes, but with no other codec."""
    import codecs

    class Sneaky:
        def __reduce__(self):
            return codecs.encode, ("eJzLSM3JyVcozy/KSQEAGgQEXQ==", "base64")

    ckpt = torch.load(_folder("nobatch") / "model.pt", weights_only=False)
    ckpt["attr_dict"]["run_name_"] = Sneaky()
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match="latin1"):
        safe_load_checkpoint(tmp_path / "model.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="zip"):
        read_scvi_tools_folder(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.txt", "hello")
    (tmp_path / "model.pt").write_bytes(buf.getvalue())
    with pytest.raises(Exception):
        read_scvi_tools_folder(tmp_path)


def test_folder_with_saved_anndata(tmp_path):
    """``model.save(dir, save_anndata=True)`` in scvi-tools leaves adata.h5ad beside model.pt."""
    import shutil

    adata, arrays, _ = _fixture_adata("default")
    shutil.copy(_folder("default") / "model.pt", tmp_path / "model.pt")
    adata.obs["_scvi_batch"] = adata.obs["donor"].cat.codes  # what scvi-tools adds to obs
    write_h5ad(adata, tmp_path / "adata.h5ad")
    model = scvi_fast.SCVI.load(tmp_path, impl="torch")
    np.testing.assert_allclose(model.get_latent_representation(), arrays["latent_mean"], rtol=2e-5, atol=2e-6)


def test_census_layout_round_trip(tmp_path):
    """The Census model's layout (2 layers, 7,400 batch categories) at a small width, both ways."""
    cats = [f"donor_{i}" for i in range(7400)]
    registry = Registry(var_names=tuple(f"ENSG{i:011d}" for i in range(40)), batch_key="batch",
                        batch_categories=tuple(cats))
    model = scvi_fast.SCVI(registry, n_hidden=16, n_latent=8, n_layers=2, impl="torch")
    model.save(tmp_path / "st", format="scvi-tools")
    state = safe_load_checkpoint(tmp_path / "st" / "model.pt")["model_state_dict"]
    for i, n_in in enumerate((8, 16)):
        w = state[f"decoder.px_decoder.fc_layers.Layer {i}.0.weight"]
        assert tuple(w.shape) == (16, n_in + 7400)
        cov = model.module.state_dict()[f"decoder.linears.{i}.weight_cov"]
        assert torch.equal(w[:, n_in:], cov.t())
    back = scvi_fast.SCVI.load(tmp_path / "st")
    assert back.batch_categories == cats and back.init_params_["n_layers"] == 2
    for k, v in model.module.state_dict().items():
        assert torch.equal(back.module.state_dict()[k], v), k


def test_loads_under_torch_force_weights_only(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    model = scvi_fast.SCVI.load(_folder("nobatch"))
    assert model.is_trained and os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"


@pytest.mark.parametrize("integer_ids", [False, True])
def test_mappings_survive_a_trip_through_the_native_format(tmp_path, integer_ids):
    """scvi-tools -> scvi_fast (saved natively, loaded again) -> scvi-tools keeps scvi-tools'
    category mappings as they were: values and dtype (e.g. integer donor ids)."""
    src = _folder("default")
    if integer_ids:
        def edit(ckpt):
            state = ckpt["attr_dict"]["registry_"]["field_registries"]["batch"]["state_registry"]
            state["categorical_mapping"] = np.asarray(state["categorical_mapping"]).astype(np.int64)

        _rewrite(src / "model.pt", tmp_path / "src", edit)
        src = tmp_path / "src"
    scvi_fast.SCVI.load(src).save(tmp_path / "native")
    native = scvi_fast.SCVI.load(tmp_path / "native")
    assert native.batch_categories == [str(c) for c in load_fixture("default")[1]["batch_categories"]]
    native.save(tmp_path / "back", format="scvi-tools")
    theirs = safe_load_checkpoint(src / "model.pt")["attr_dict"]["registry_"]["field_registries"]
    ours = safe_load_checkpoint(tmp_path / "back" / "model.pt")["attr_dict"]["registry_"]["field_registries"]
    for field in ("batch", "labels"):
        ma = np.asarray(theirs[field]["state_registry"]["categorical_mapping"])
        mb = np.asarray(ours[field]["state_registry"]["categorical_mapping"])
        assert ma.dtype == mb.dtype and ma.tolist() == mb.tolist(), field
    assert (np.asarray(ours["batch"]["state_registry"]["categorical_mapping"]).dtype
            == (np.int64 if integer_ids else object))
    # the pass-through tensors and the trained flag came along too
    again = safe_load_checkpoint(tmp_path / "back" / "model.pt")
    ref = safe_load_checkpoint(src / "model.pt")
    assert again["attr_dict"]["is_trained_"] is True
    for k, v in ref["model_state_dict"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, again["model_state_dict"][k]), k
