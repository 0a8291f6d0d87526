"""A saved model is verified before anything is built from it: architecture values within
bounds, every tensor's checksum, shape and dtype, and finite weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import scvi_fast
from scvi_fast.data import synthetic_anndata
from scvi_fast.module import StateMismatchError, state_checksums


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ad = synthetic_anndata(n_cells=120, n_genes=40, n_batches=2, n_cell_types=2, density=0.4,
                           seed=3)
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch")
    model = scvi_fast.SCVI(ad, n_hidden=16, n_latent=4)
    path = tmp_path_factory.mktemp("m") / "model"
    model.save(path)
    return path


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(saved, dst)
    return dst


def _rewrite(path, change_tensors=None, change_config=None, resum=True):
    tensors = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    if change_tensors:
        change_tensors(tensors)
        save_file(tensors, str(path / "model.safetensors"))
    if change_config:
        change_config(cfg)
    if resum:
        cfg["checksums"] = state_checksums(tensors)
    (path / "config.json").write_text(json.dumps(cfg))


def test_a_saved_model_loads(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = scvi_fast.SCVI.load(saved)
    assert model.module.n_hidden == 16


@pytest.mark.parametrize("key, value, match", [
    ("n_layers", 100000, r"n_layers must be an integer in \[1, 16\]; got 100000"),
    ("n_hidden", 10**9, r"n_hidden must be an integer in \[1, 16384\]"),
    ("n_hidden", -4, "n_hidden must be an integer"),
    ("n_latent", "10", r"n_latent must be an integer in \[1, 1024\]; got '10'"),
    ("dropout_rate", 2.0, "dropout_rate must be a number"),
])
def test_config_values_are_bounded_before_building(saved, tmp_path, key, value, match):
    path = _copy(saved, tmp_path)
    _rewrite(path, change_config=lambda c: c["init_params"].__setitem__(key, value))
    with pytest.raises(ValueError, match=match):
        scvi_fast.SCVI.load(path)


def test_a_flipped_byte_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-9] ^= 0x40  # inside the last tensor's data
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(StateMismatchError, match=r"tensor '.*' is damaged"):
        scvi_fast.SCVI.load(path)


def test_float_tensors_saved_as_int_are_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _rewrite(path, lambda t: t.__setitem__("module.px_r", t["module.px_r"].to(torch.int32)))
    with pytest.raises(StateMismatchError, match=r"'px_r' is stored as torch.int32, the model's "
                                                 r"is torch.float32"):
        scvi_fast.SCVI.load(path)


def test_wrong_shapes_and_keys_are_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _rewrite(path, lambda t: t.__setitem__("module.px_r", torch.zeros(41)))
    with pytest.raises(StateMismatchError, match=r"'px_r' has shape \(41,\), the model's is \(40,\)"):
        scvi_fast.SCVI.load(path)
    path2 = _copy(saved, tmp_path / "b")
    _rewrite(path2, lambda t: t.pop("module.px_r"))
    with pytest.raises(StateMismatchError, match=r"missing \['px_r'\]"):
        scvi_fast.SCVI.load(path2)


def test_non_finite_weights_are_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)

    def poison(t):
        t["module.px_r"][3] = float("nan")

    _rewrite(path, poison)
    with pytest.raises(StateMismatchError, match=r"'px_r' holds 1 NaN or infinite values"):
        scvi_fast.SCVI.load(path)


def test_models_without_checksums_load_with_a_warning(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _rewrite(path, change_config=lambda c: c.pop("checksums"), resum=False)
    with pytest.warns(UserWarning, match="saved without checksums"):
        scvi_fast.SCVI.load(path)


@pytest.mark.parametrize("call", ["latent", "latent_out", "expression", "elbo"])
def test_outputs_are_never_returned_with_nan(saved, tmp_path, call):
    """Weights damaged in memory (after loading) give a clear error, not NaN outputs; a
    streamed embedding leaves no file behind."""
    from scvi_fast.analysis import NonFiniteOutputError

    ad = synthetic_anndata(n_cells=120, n_genes=40, n_batches=2, n_cell_types=2, density=0.4,
                           seed=3)
    model = scvi_fast.SCVI.load(saved, adata=ad)
    with torch.no_grad():
        model.module.encoder.mean.bias[0] = float("nan")
        model.module.px_r[0] = float("nan")
    out = tmp_path / "z.npy"
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite"):
        {"latent": lambda: model.get_latent_representation(),
         "latent_out": lambda: model.get_latent_representation(out=out),
         "expression": lambda: model.get_normalized_expression(),
         "elbo": lambda: model.get_elbo()}[call]()
    assert not out.exists()
