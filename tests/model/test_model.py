"""The user-facing SCVI class: setup validation, training, resume, save/load, inference API."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvi_fast
from scvi_fast.data import synthetic_anndata, write_h5ad

TRAIN = dict(max_epochs=3, batch_size=64, progress_bar=False, device="cpu")


@pytest.fixture
def adata():
    ad = synthetic_anndata(n_cells=300, n_genes=80, n_batches=3, n_cell_types=3, seed=7)
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch", labels_key="cell_type")
    return ad


def _params(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- bad input --
def test_missing_batch_key_is_a_clear_error(adata):
    with pytest.raises(KeyError, match="batch_key='donor' is not a column"):
        scvi_fast.SCVI.setup_anndata(adata, batch_key="donor")


@pytest.mark.parametrize(
    "poison, message",
    [
        (-1.0, "negative"),
        (0.5, "non-integer"),
        (np.nan, "NaN"),
        (np.inf, "infinite"),
    ],
)
def test_bad_counts_are_refused_before_training(adata, poison, message):
    X = adata.X.toarray()
    X[3, 5] = poison
    adata.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match=message):
        scvi_fast.SCVI.setup_anndata(adata, batch_key="batch")


def test_empty_cells_are_refused(adata):
    X = adata.X.tolil()
    X[[4, 9], :] = 0
    adata.X = X.tocsr()
    with pytest.raises(ValueError, match="zero total counts"):
        scvi_fast.SCVI.setup_anndata(adata, batch_key="batch")


def test_not_set_up_is_a_clear_error():
    ad = synthetic_anndata(n_cells=50, n_genes=20, n_batches=1, n_cell_types=2, seed=1)
    with pytest.raises(ValueError, match="setup_anndata"):
        scvi_fast.SCVI(ad)


def test_gene_mismatch_and_unknown_batch_at_inference(adata):
    model = scvi_fast.SCVI(adata, n_hidden=16, n_latent=4)
    other = adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="genes differ from the model's.*different order"):
        model.get_latent_representation(other)
    new = adata.copy()
    new.obs["batch"] = new.obs["batch"].astype(str)
    new.obs.iloc[0, new.obs.columns.get_loc("batch")] = "never-seen"
    with pytest.raises(ValueError, match="never-seen"):
        model.get_latent_representation(new)


# --------------------------------------------------------------- training --
def test_training_is_reproducible_and_logs_history(adata):
    a = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch").train(
        seed=3, check_val_every_n_epoch=1, **TRAIN)
    b = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch").train(
        seed=3, check_val_every_n_epoch=1, **TRAIN)
    _assert_same_params(_params(a), _params(b))
    h = a.history
    for key in ("elbo_train", "reconstruction_loss_train", "kl_local_train",
                "elbo_validation", "reconstruction_loss_validation", "kl_local_validation", "kl_weight"):
        assert key in h and len(h[key]) == TRAIN["max_epochs"], key
        assert h[key].index.name == "epoch"
    np.testing.assert_allclose(
        h["elbo_train"]["elbo_train"].to_numpy(),
        h["reconstruction_loss_train"]["reconstruction_loss_train"].to_numpy()
        + h["kl_local_train"]["kl_local_train"].to_numpy(), rtol=1e-6)
    assert h["kl_weight"]["kl_weight"].tolist() == [0.0, 1 / 400, 2 / 400]
    assert len(a.train_indices) + len(a.validation_indices) == adata.n_obs
    assert not set(a.train_indices) & set(a.validation_indices)


def test_training_improves_the_elbo(adata):
    model = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5)
    before = model.get_elbo()
    model.train(max_epochs=15, batch_size=64, progress_bar=False, device="cpu", n_epochs_kl_warmup=5)
    after = model.get_elbo()
    assert after > before + 1.0, (before, after)
    assert model.get_reconstruction_error()["reconstruction_loss"] > 0


def test_resume_after_epochs_equals_uninterrupted(adata, tmp_path):
    full = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch")
    full.train(max_epochs=4, batch_size=64, progress_bar=False, device="cpu")
    part = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch")
    part.train(max_epochs=2, batch_size=64, progress_bar=False, device="cpu", checkpoint_dir=tmp_path)
    resumed = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch")
    resumed.train(max_epochs=4, batch_size=64, progress_bar=False, device="cpu",
                  checkpoint_dir=tmp_path, resume=True)
    _assert_same_params(_params(full), _params(resumed))
    assert resumed.history_["elbo_train"] == pytest.approx(full.history_["elbo_train"], rel=1e-12)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_mid_epoch(adata, tmp_path, monkeypatch):
    """A run killed inside epoch 2 resumes at the next minibatch and ends bitwise equal."""
    full = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch")
    full.train(max_epochs=3, batch_size=64, progress_bar=False, device="cpu")
    steps_full = full.trainer.global_step

    from scvi_fast.train import _trainer

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 0 has 4 steps (270 train cells / 64): die in epoch 1
            raise _Killed
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    victim = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch")
    with pytest.raises(_Killed):
        victim.train(max_epochs=3, batch_size=64, progress_bar=False, device="cpu",
                     checkpoint_dir=tmp_path, checkpoint_every_n_steps=1)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert _trainer.CHECKPOINT_NAME in {p.name for p in tmp_path.iterdir()}
    resumed = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5, impl="torch")
    resumed.train(max_epochs=3, batch_size=64, progress_bar=False, device="cpu",
                  checkpoint_dir=tmp_path, checkpoint_every_n_steps=1, resume=True)
    assert resumed.trainer.global_step == steps_full
    _assert_same_params(_params(full), _params(resumed))
    assert resumed.history_["elbo_train"] == pytest.approx(full.history_["elbo_train"], rel=1e-9)


def test_census_preset_shape_and_defaults(adata):
    model = scvi_fast.SCVI(adata, preset="census")
    assert (model.module.n_hidden, model.module.n_latent, model.module.n_layers) == (512, 50, 2)
    assert model.module.decoder.linears[1].weight_cov.shape == (3, 512)
    model.train(max_epochs=1, progress_bar=False, device="cpu")
    assert model.train_params_["lr"] == 1e-4 and model.train_params_["batch_size"] == 1024
    assert model.train_params_["n_epochs_kl_warmup"] == 20


# ------------------------------------------------------------- inference API --
def test_latent_and_normalized_expression(adata):
    model = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5).train(**TRAIN)
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 5) and np.isfinite(z).all()
    z2 = model.get_latent_representation(batch_size=17)
    np.testing.assert_allclose(z, z2, rtol=1e-5, atol=1e-6)
    sub = model.get_latent_representation(indices=[5, 1, 9])
    np.testing.assert_allclose(sub, z[[5, 1, 9]], rtol=1e-5, atol=1e-6)
    m, v = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(m, z, rtol=1e-6)
    assert (v > 0).all()
    # a posterior sample: standardised by (m, v) it is N(0, 1) (n_obs x 5 draws)
    torch.manual_seed(1)
    zs = model.get_latent_representation(give_mean=False)
    std = float(((zs - m) / np.sqrt(v)).std())
    assert zs.size >= 500 and 0.85 < std < 1.15, std

    torch.manual_seed(0)
    expr = model.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame) and expr.shape == (adata.n_obs, adata.n_vars)
    assert list(expr.index) == list(adata.obs_names)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-5)
    genes = list(adata.var_names[[3, 0]])
    sub = model.get_normalized_expression(gene_list=genes, library_size=1e4)
    assert list(sub.columns) == genes
    lat = model.get_normalized_expression(library_size="latent")
    assert np.allclose(lat.sum(1), np.asarray(adata.X.sum(1)).ravel(), rtol=1e-4)
    arr = model.get_normalized_expression(n_samples=3, return_mean=False)
    assert arr.shape == (3, adata.n_obs, adata.n_vars)


def test_save_load_roundtrip_and_setup_transfer(adata, tmp_path):
    model = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5).train(**TRAIN)
    z = model.get_latent_representation()
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    new = adata.copy()
    new.uns.pop("_scvi_fast_setup")
    loaded = scvi_fast.SCVI.load(tmp_path / "m", adata=new)
    assert loaded.is_trained
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    assert loaded.history_["elbo_train"] == model.history_["elbo_train"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cli_train_default_runs(tmp_path, capsys):
    from scvi_fast.cli import main

    rc = main(["train", "--n-cells", "300", "--max-epochs", "2", "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Wrote" in out and (tmp_path / "o" / "adata_scvi.h5ad").exists()
    import anndata

    ad = anndata.read_h5ad(tmp_path / "o" / "adata_scvi.h5ad")
    assert ad.obsm["X_scVI"].shape == (300, 10)
    rc = main(["embed", str(tmp_path / "o" / "model"), str(tmp_path / "o" / "adata_scvi.h5ad"),
               "--out", str(tmp_path / "z.npy")])
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), ad.obsm["X_scVI"], rtol=1e-5, atol=1e-6)


def test_streaming_embedding_from_backed_h5ad_and_store(adata, tmp_path):
    """Embedding streams from disk into a .npy memmap and equals the in-memory result."""
    import anndata

    from scvi_fast.data import CSRStore

    model = scvi_fast.SCVI(adata, n_hidden=32, n_latent=5).train(**TRAIN)
    z = model.get_latent_representation()
    write_h5ad(adata, tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    zb = model.get_latent_representation(backed, out=tmp_path / "zb.npy", batch_size=50)
    assert isinstance(zb, np.memmap) or isinstance(zb, np.ndarray)
    np.testing.assert_allclose(np.load(tmp_path / "zb.npy"), z, rtol=1e-5, atol=1e-6)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    store = CSRStore.create(tmp_path / "s.store", adata, batch_key="batch", labels_key="cell_type")
    zs = model.get_latent_representation(store, out=tmp_path / "zs.npy")
    np.testing.assert_allclose(np.asarray(zs), z, rtol=1e-5, atol=1e-6)
    # a model trained from the store path sees the same cells
    m2 = scvi_fast.SCVI(str(tmp_path / "s.store"), n_hidden=16, n_latent=4)
    assert m2.batch_categories == list(adata.obs["batch"].cat.categories)
    m2.train(max_epochs=1, batch_size=64, progress_bar=False, device="cpu")
    assert m2.get_latent_representation().shape == (adata.n_obs, 4)
