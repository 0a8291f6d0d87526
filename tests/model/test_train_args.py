"""``SCVI.train`` with scvi-tools' arguments: devices, plan, split, validation, Lightning options."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import scvi_fast
from scvi_fast.data import synthetic_anndata
from scvi_fast.model import _train_args
from scvi_fast.model._training import split
from scvi_fast.module import kl_weight
from scvi_fast.train import Trainer
from scvi_fast.train._step import StepRunner

FAST = dict(max_epochs=2, batch_size=64, accelerator="cpu", enable_progress_bar=False)


@pytest.fixture
def adata():
    ad = synthetic_anndata(n_cells=300, n_genes=80, n_batches=3, n_cell_types=3, seed=7)
    scvi_fast.SCVI.setup_anndata(ad, batch_key="batch")
    return ad


def _model(adata):
    return scvi_fast.SCVI(adata, n_hidden=16, n_latent=4, impl="torch")


# ------------------------------------------------------------------ devices --
def test_accelerators_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _train_args.resolve_devices("auto", "auto") == _train_args.Devices("cpu", None, 1)
    assert _train_args.resolve_devices("cpu", 2).nproc == 2
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _train_args.resolve_devices("gpu", 1)
    with pytest.raises(ValueError, match="'mps' is not supported"):
        _train_args.resolve_devices("mps", 1)
    with pytest.raises(ValueError, match="lists device ids"):
        _train_args.resolve_devices("cpu", [0, 1])
    assert _train_args.resolve_single_device("auto", "auto") == torch.device("cpu")


def test_gpu_devices_are_read_as_lightning_reads_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    r = _train_args.resolve_devices
    assert r("gpu", "auto") == _train_args.Devices("cuda", (0,), 1)  # "auto": one GPU
    assert r("auto", [0, 1]) == _train_args.Devices("cuda", (0, 1), 2)  # DDP over GPUs 0, 1
    assert r("cuda", [2]).device == torch.device("cuda", 2)  # one id: that GPU
    assert r("gpu", "1,3").ids == (1, 3) and r("gpu", "2").ids == (0, 1)
    assert r("gpu", -1).nproc == 4
    assert r("auto", "auto", device="cuda:3").device == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="do not exist"):
        r("gpu", [5])
    with pytest.raises(ValueError, match="twice"):
        r("gpu", [1, 1])
    with pytest.raises(ValueError, match="disagree"):
        r("cpu", "auto", device="cuda:0")
    assert _train_args.resolve_single_device("auto", 2) == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="single device"):
        _train_args.resolve_single_device("auto", "0,1")


def test_strategies():
    assert _train_args.strategy_name("ddp_find_unused_parameters_true") == "ddp"
    assert _train_args.strategy_name("auto") == "auto"
    with pytest.raises(ValueError, match="deepspeed"):
        _train_args.strategy_name("deepspeed")


# ------------------------------------------------------------ Lightning options --
def test_lightning_options_warn_or_refuse_by_name(adata):
    model = _model(adata)
    with pytest.warns(UserWarning, match="logger, log_every_n_steps"):
        model.train(logger=False, log_every_n_steps=5, **FAST)
    with pytest.raises(NotImplementedError, match="gradient_clip_val=1.0"):
        model.train(gradient_clip_val=1.0, **FAST)
    with pytest.raises(NotImplementedError, match="callbacks"):
        model.train(callbacks=[object()], **FAST)
    with pytest.raises(TypeError, match="not_an_option"):
        model.train(not_an_option=3, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's neutral values pass silently
        model.train(gradient_clip_val=None, accumulate_grad_batches=1, callbacks=[],
                    load_sparse_tensor=True, precision="32-true", **FAST)
    with pytest.raises(ValueError, match="precision"):
        model.train(precision="16-mixed", **FAST)
    with pytest.raises(NotImplementedError, match="datamodule"):
        model.train(datamodule=object(), **FAST)


def test_plan_kwargs_are_scvi_tools_training_plan(adata):
    model = _model(adata)
    with pytest.raises(NotImplementedError, match="Custom"):
        model.train(plan_kwargs={"optimizer": "Custom"}, **FAST)
    with pytest.raises(TypeError, match="no_such"):
        model.train(plan_kwargs={"no_such": 1}, **FAST)
    with pytest.raises(ValueError, match="larger than"):
        model.train(plan_kwargs={"min_kl_weight": 2.0}, **FAST)
    model.train(plan_config={"optimizer": "AdamW", "lr": 1.0}, plan_kwargs={"lr": 2e-3}, **FAST)
    opt = model.trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 2e-3


def test_per_step_kl_warmup_follows_the_global_step(adata, monkeypatch):
    """``n_epochs_kl_warmup=None, n_steps_kl_warmup=k``: the step reads scvi-tools' weight at
    its global step (5 steps a epoch here), through warm-up and after it."""
    seen = []
    run = StepRunner.run

    def spy(self, x, train, *args, **kwargs):
        if train:
            seen.append(float(self.kl_weight))
        return run(self, x, train, *args, **kwargs)

    monkeypatch.setattr(StepRunner, "run", spy)
    model = _model(adata)
    model.train(plan_kwargs={"n_epochs_kl_warmup": None, "n_steps_kl_warmup": 7,
                             "max_kl_weight": 0.5, "min_kl_weight": 0.1}, **FAST)
    want = [np.float32(kl_weight(0, None, 0.5, 0.1, step=s, n_steps_kl_warmup=7))
            for s in range(len(seen))]
    assert len(seen) == 10 and seen == [float(w) for w in want]
    assert seen[-1] == np.float32(0.5) and seen[0] == np.float32(0.1)
    # n_epochs_kl_warmup wins when both are given, as in scvi-tools
    assert kl_weight(1, 4, step=100, n_steps_kl_warmup=200) == 0.25


# ----------------------------------------------------------------- the split --
def test_split_is_scvi_tools_data_splitter():
    with pytest.warns(UserWarning, match="2 cells moved"):
        tr, va, te = split(1002, None, None, 100, seed=0)  # ceil(0.9*1002)=902 -> 900 + 2 moved
    assert (len(tr), len(va), len(te)) == (900, 102, 0)
    with pytest.warns(UserWarning, match="small size of 2"):
        tr, va, _ = split(1002, 0.9, None, 100, seed=0)  # explicit: warned, not moved
    assert len(tr) == 902
    tr, va, te = split(100, 0.5, 0.3, 128, seed=0, shuffle=False)
    np.testing.assert_array_equal(va, np.arange(30))  # validation first, as DataSplitter
    np.testing.assert_array_equal(tr, np.arange(30, 80))
    np.testing.assert_array_equal(te, np.arange(80, 100))
    perm = np.random.RandomState(seed=4).permutation(50)
    tr, va, _ = split(50, 0.8, None, 128, seed=4)
    np.testing.assert_array_equal(va, np.sort(perm[:10]))
    ext = [np.arange(10, 50), np.arange(10)]
    tr, va, te = split(50, None, None, 16, seed=0, external_indexing=ext)
    assert len(tr) == 40 and len(va) == 10 and len(te) == 0
    with pytest.raises(ValueError, match="overlapping"):
        split(50, None, None, 16, seed=0, external_indexing=[np.arange(50), np.arange(3)])
    with pytest.raises(ValueError, match="missing indices"):
        split(50, None, None, 16, seed=0, external_indexing=[np.arange(40)])


def test_split_options_reach_the_model(adata):
    model = _model(adata)
    model.train(train_size=0.5, validation_size=0.2, shuffle_set_split=False, **FAST)
    np.testing.assert_array_equal(model.validation_indices, np.arange(60))
    np.testing.assert_array_equal(model.train_indices, np.arange(60, 210))
    np.testing.assert_array_equal(model.test_indices, np.arange(210, 300))
    model.train(datasplitter_kwargs={"external_indexing": [np.arange(100, 300), np.arange(100)],
                                     "drop_last": True}, **FAST)
    np.testing.assert_array_equal(model.validation_indices, np.arange(100))
    assert model.trainer.train_loader.sampler.drop_last
    with pytest.raises(TypeError, match="train_size"):
        model.train(datasplitter_kwargs={"train_size": 0.5}, **FAST)
    with pytest.warns(UserWarning, match="num_workers"):
        model.train(datasplitter_kwargs={"num_workers": 4}, **FAST)


# --------------------------------------------------------- validation, stopping --
def test_validation_runs_when_scvi_tools_runs_it(adata):
    model = _model(adata)
    model.train(**FAST)  # scvi-tools' default: no validation pass
    assert "elbo_validation" not in model.history_ and model.trainer.val_loader is None
    model.train(**(FAST | {"max_epochs": 5}), check_val_every_n_epoch=2)
    assert len(model.history_["elbo_validation"]) == 2
    assert model.history["elbo_validation"].index.tolist() == [1, 3]
    assert model.history["elbo_train"].index.tolist() == [0, 1, 2, 3, 4]
    model.train(early_stopping=True, **FAST)  # early stopping validates every epoch
    assert len(model.history_["elbo_validation"]) == 2
    model.train(trainer_config={"check_val_every_n_epoch": 1}, **FAST)
    assert len(model.history_["elbo_validation"]) == 2


def test_early_stopping_mode_and_warmup():
    trainer = Trainer.__new__(Trainer)
    trainer.early_stopping, trainer.monitor, trainer.patience = True, "elbo_train", 2
    trainer.min_delta, trainer.mode, trainer.es_warmup = 0.5, "max", 2
    trainer._best, trainer._wait, trainer._es_checks, trainer.stopped_early = -np.inf, 0, 0, False
    trainer.history = {"elbo_train": []}
    stops = []
    for v in [0.0, 9.0, 1.0, 1.4, 1.2, 1.6]:  # checks 1-2 warm-up; then 1.0 best, +0.4 and
        trainer.history["elbo_train"].append(v)  # +0.2 are no improvement over min_delta 0.5
        trainer._update_early_stopping()
        stops.append(trainer.stopped_early)
    assert stops == [False, False, False, False, True, True]
    assert trainer._best == 1.6  # an improvement after the stop still updates the best


def test_reduce_lr_on_plateau(adata):
    model = _model(adata)
    model.train(**(FAST | {"max_epochs": 3}), plan_kwargs={
        "reduce_lr_on_plateau": True, "lr_patience": 0, "lr_factor": 0.5,
        "lr_threshold": 1e9})  # after the first (better than inf) never "better" by 1e9
    # the rate each epoch trained with (LearningRateMonitor), halved after epochs 1 and 2
    assert model.history_["lr-Adam"] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert model.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert len(model.history_["elbo_validation"]) == 3  # the scheduler's metric is computed


def test_max_epochs_heuristic():
    from scvi_fast.model._config import max_epochs_heuristic

    assert max_epochs_heuristic(1000) == 400 and max_epochs_heuristic(40_000) == 200
    with pytest.warns(UserWarning, match="set to 1"):
        assert max_epochs_heuristic(10_000_000) == 1
