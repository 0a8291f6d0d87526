"""Training checkpoints: checksummed, verified on load, non-finite and foreign weights refused."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

import scvi_fast
from scvi_fast.data import synthetic_anndata
from scvi_fast.train import CheckpointError, atomic_torch_save, load_checkpoint
from scvi_fast.train._checkpoint import CHECKSUM_KEY

TRAIN = dict(batch_size=64, progress_bar=False, device="cpu")
WEIGHT = "encoder.first.weight"


@pytest.fixture(scope="module")
def adata():
    ad = synthetic_anndata(n_cells=200, n_genes=50, n_batches=2, n_cell_types=3, seed=5)
    ad = ad[np.asarray(ad.X.sum(axis=1)).ravel() > 0].copy()
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch")
    return ad


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "module": {"w": torch.randn(37, 19, generator=g), "b": torch.randn(19, generator=g),
                   "steps": torch.tensor(7), "empty": torch.zeros(0, 3)},
        "half": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "rng": [torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g), None],
        "pair": (torch.randn(2, generator=g), 3),
        "epoch": 4, "history": {"elbo_train": [97.25, 95.5]}, "best": float("inf"),
    }


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_round_trip_is_exact_and_quiet(tmp_path):
    state = _state(1)
    atomic_torch_save(state, tmp_path / "c.pt")
    assert CHECKSUM_KEY in torch.load(tmp_path / "c.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_checkpoint(tmp_path / "c.pt")
    _assert_same(got, state)  # the checksum record is not handed back


def test_flipped_bytes_in_a_tensor_are_named(tmp_path):
    # torch.load itself does not notice damaged tensor bytes: it returns other numbers
    state = _state(2)
    atomic_torch_save(state, tmp_path / "c.pt")
    raw = bytearray((tmp_path / "c.pt").read_bytes())
    at = raw.find(state["module"]["w"].numpy().tobytes())
    assert at > 0
    for k in range(8):
        raw[at + 1000 + k] ^= 0xFF
    (tmp_path / "c.pt").write_bytes(bytes(raw))
    assert not torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["module"]["w"],
                           state["module"]["w"])
    with pytest.raises(CheckpointError, match=r"damaged: the tensor module/w \(torch.float32, "
                                              r"shape \(37, 19\)\) fails its checksum"):
        load_checkpoint(tmp_path / "c.pt")


def test_changed_plain_entries_and_missing_tensors_are_refused(tmp_path):
    atomic_torch_save(_state(3), tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["history"]["elbo_train"][1] = 94.5
    torch.save(raw, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="non-tensor entries .* fail their checksum"):
        load_checkpoint(tmp_path / "d.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    del raw["module"]["b"]
    torch.save(raw, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="the tensor module/b is missing"):
        load_checkpoint(tmp_path / "e.pt")


class _Anything:
    pass


def test_unpickling_stays_weights_only(tmp_path):
    with open(tmp_path / "c.pt", "wb") as fh:
        torch.save({"module": {}, "payload": _Anything()}, fh, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="could not read the training checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def _checkpointed(adata, tmp_path, n_hidden=32):
    model = scvi_fast.SCVI(adata, n_hidden=n_hidden, n_latent=4, impl="torch")
    model.train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    return tmp_path / "checkpoint.pt"


def _poison(path, resave):
    state = torch.load(path, weights_only=True)
    state["module"][WEIGHT][3, 5] = float("nan")
    if resave:  # written again through the package: fresh checksums over the NaN
        state.pop(CHECKSUM_KEY)
        atomic_torch_save(state, path)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("resave", [False, True], ids=["edited", "resaved"])
def test_resume_refuses_a_nan_weight(adata, tmp_path, resave):
    path = _checkpointed(adata, tmp_path)
    _poison(path, resave)
    model = scvi_fast.SCVI(adata, n_hidden=32, n_latent=4, impl="torch")
    msg = (f"tensor module/{WEIGHT} .* fails its checksum" if not resave
           else f"holds NaN values in module/{WEIGHT}")
    with pytest.raises(CheckpointError, match=msg):
        model.train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    assert not model.is_trained


def test_resume_with_another_architecture_names_the_parameter(adata, tmp_path):
    _checkpointed(adata, tmp_path, n_hidden=32)
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4, impl="torch")
    with pytest.raises(CheckpointError) as info:
        model.train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    msg = str(info.value)
    assert f"{WEIGHT} has shape (50, 32) there and (50, 16) in this model" in msg
    assert "written for another model" in msg and "Error(s) in loading" not in msg


def test_module_check_names_missing_and_extra_parameters(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    atomic_torch_save({"module": {k: v for k, v in saved.items() if k != "1.weight"}},
                      tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"it has no 1.weight \(shape \(2, 4\) in this model\)"):
        load_checkpoint(tmp_path / "a.pt", module=module)
    atomic_torch_save({"module": saved | {"2.weight": torch.ones(1)}}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"it holds 2.weight \(shape \(1,\)\)"):
        load_checkpoint(tmp_path / "b.pt", module=module)
    atomic_torch_save({"module": saved}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt", module=module)["module"].keys() == saved.keys()


def test_checkpoint_without_checksums_still_resumes(adata, tmp_path):
    path = _checkpointed(adata, tmp_path)
    state = torch.load(path, weights_only=True)
    state.pop(CHECKSUM_KEY)
    torch.save(state, path)  # as scvi_fast wrote checkpoints before checksums
    model = scvi_fast.SCVI(adata, n_hidden=32, n_latent=4, impl="torch")
    with pytest.warns(UserWarning, match="has no checksums"):
        model.train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    assert len(model.history_["elbo_train"]) == 3
    assert np.isfinite(model.history_["elbo_train"]).all()
