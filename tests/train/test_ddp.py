"""Data-parallel training on the CPU: gloo, 2 processes started by torchrun / the elastic launcher.

One uninterrupted 2-rank run (``_ddp_worker.py`` under ``torchrun``) is the reference for the
sharding, parameter-equality and embedding tests and for the kill-and-resume test; a second
2-rank run goes through ``SCVI.train(strategy="ddp", devices=2)`` and is compared with a
1-rank run at the same global minibatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import scvi_fast
from scvi_fast.data import CSRStore, shard_range, synthetic_anndata
from scvi_fast.model._training import split
from scvi_fast.train import _distributed, load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_ddp_worker.py")
# 400 cells: 360 train (180 per rank), 40 validation; per-rank minibatch 32 -> 6 steps/epoch
EPOCHS, BATCH, STEPS_PER_EPOCH = 3, 32, 6
MODEL = dict(n_hidden=32, n_latent=5, impl="torch")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "store"
    ad = synthetic_anndata(n_cells=400, n_genes=100, n_batches=2, n_cell_types=3, seed=3)
    CSRStore.create(path, ad, batch_key="batch", labels_key="cell_type")
    return path


def _torchrun(cfg: dict, max_restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", str(WORKER), json.dumps(cfg)]
    # the worker script's folder is its sys.path[0]: put this checkout first, so the ranks run
    # the scvi_fast under test and not another installed copy
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _run(store: Path, out: Path, max_restarts: int = 0, **cfg) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(store=str(store), out=str(out), max_epochs=EPOCHS, batch_size=BATCH,
               checkpoint_dir=str(out.parent / "checkpoints"), every=1) | cfg
    return _torchrun(cfg, max_restarts)


def _result(out: Path, rank: int, attempt: int = 0) -> dict:
    return torch.load(out / f"result.rank{rank}.attempt{attempt}.pt", weights_only=False)


def _losses(out: Path, rank: int, attempt: int = 0) -> list[float]:
    return [float(v) for v in (out / f"losses.rank{rank}.attempt{attempt}.txt").read_text().split()]


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run (checkpoint every step, as the interrupted runs below)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _check(_run(store, out, embed=True))
    return out


# ------------------------------------------------------------------ sharding --
def test_every_training_cell_once_per_epoch(reference):
    r0, r1 = _result(reference, 0), _result(reference, 1)
    np.testing.assert_array_equal(r0["train_indices"], r1["train_indices"])  # same split
    train = r0["train_indices"]
    assert len(train) == 360 and len(r0["validation_indices"]) == 40
    assert sorted(r0["seen"]) == list(range(EPOCHS))
    for epoch in range(EPOCHS):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert len(a) == len(b) == 180  # the same number of cells (and steps) on each rank
        assert not np.intersect1d(a, b).size
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), train)
    assert not np.array_equal(r0["seen"][0], r0["seen"][1])  # reshuffled each epoch
    assert r0["global_step"] == r1["global_step"] == EPOCHS * STEPS_PER_EPOCH


def test_ranks_hold_identical_parameters_after_each_epoch(reference, store):
    r0, r1 = _result(reference, 0), _result(reference, 1)
    assert len(r0["snapshots"]) == len(r1["snapshots"]) == EPOCHS
    first = r0["snapshots"][0]
    # weights and BatchNorm running statistics (averaged over ranks at the end of each pass)
    assert any("running_mean" in k for k in first)
    for s0, s1 in zip(r0["snapshots"], r1["snapshots"]):
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k
    # keys are the module's own (DDP wraps the module, nothing inside is replaced)
    assert set(first) == set(scvi_fast.SCVI(str(store), **MODEL).module.state_dict())
    # metrics are over all ranks, so every rank logs the same history
    assert r0["history"] == r1["history"]


def test_distributed_embedding_matches_one_process(reference, store):
    r0, r1 = _result(reference, 0), _result(reference, 1)
    z_file = np.load(reference / "latent.npy")
    assert z_file.shape == (400, 5)
    assert not list(reference.glob(".*partial*"))
    np.testing.assert_array_equal(z_file, r0["latent_gathered"])
    np.testing.assert_array_equal(z_file, r1["latent_gathered"])
    model = scvi_fast.SCVI(str(store), **MODEL)
    model.module.load_state_dict(r0["state"])
    np.testing.assert_allclose(z_file, model.get_latent_representation(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ fault tolerance --
def test_kill_mid_epoch_relaunch_and_elastic_restart(reference, store, tmp_path):
    """Rank 1 dies inside epoch 1; a relaunch with resume=True continues, its rank 0 dies in
    epoch 2, torchrun restarts the group and it resumes again: same steps, same curve."""
    killed, relaunched = tmp_path / "killed", tmp_path / "relaunched"
    proc = _run(store, killed, die={"rank": 1, "after_steps": 8, "attempt": 0})
    assert proc.returncode != 0
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt")
    # rank 1 left right after step 8, before anyone could checkpoint it
    assert ckpt["global_step"] == 7 and ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 1
    assert ckpt["world_size"] == 2 and len(ckpt["rank_rng"]) == 2

    _check(_run(store, relaunched, max_restarts=1, resume=True,
                die={"rank": 0, "after_steps": 7, "attempt": 0}))
    assert not (relaunched / "result.rank0.attempt0.pt").exists()  # attempt 0 died (step 14)
    ref = _result(reference, 0)
    for rank in (0, 1):
        res = _result(relaunched, rank, attempt=1)
        assert res["global_step"] == ref["global_step"] == EPOCHS * STEPS_PER_EPOCH
        for k, v in ref["state"].items():
            torch.testing.assert_close(res["state"][k], v, rtol=1e-6, atol=1e-7)
        assert res["history"]["elbo_train"] == pytest.approx(ref["history"]["elbo_train"], rel=1e-6)
        # the loss curve continues where it stopped: steps 1-7, 8-13, 14-18 of the three runs
        curve = (_losses(killed, rank)[:7] + _losses(relaunched, rank, 0)[:6]
                 + _losses(relaunched, rank, 1))
        assert curve == pytest.approx(_losses(reference, rank), rel=1e-6)


# ------------------------------------------------ launcher, 1 rank vs 2 ranks --
def test_two_ranks_match_one_rank_at_the_same_global_batch(store):
    """``train(strategy="ddp", devices=2)`` with 32 cells per rank against one process with 64.

    The two runs see different minibatch compositions, sampling noise and BatchNorm batches
    (32 cells per rank), so they agree in distribution, not bitwise. Tolerance: 1.0 nat per
    cell of validation loss after 3 epochs. Over 8 one-process runs with this split and
    different shuffles and noise seeds the final value spread with a standard deviation of
    0.23 (52.3-53.0), so two independent runs differ by more than 1.0 with probability
    below 0.3 %; a run taking twice as many steps (one process at 32 cells, what each rank
    training on all the data would amount to) ends 2.7 nats lower, outside the tolerance.
    """
    one = scvi_fast.SCVI(str(store), **MODEL)
    one.train(max_epochs=EPOCHS, batch_size=2 * BATCH, seed=0, progress_bar=False, device="cpu",
              check_val_every_n_epoch=1)
    two = scvi_fast.SCVI(str(store), **MODEL)
    two.train(max_epochs=EPOCHS, batch_size=BATCH, seed=0, progress_bar=False, device="cpu",
              devices=2, check_val_every_n_epoch=1)  # strategy "auto" becomes "ddp" with several devices
    assert two.is_trained_ and two.trainer.world_size == 2
    assert two.trainer.global_step == one.trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    assert two.trainer.cells_trained == one.trainer.cells_trained == EPOCHS * 360
    np.testing.assert_array_equal(two.validation_indices, one.validation_indices)
    assert two.history_["elbo_validation"][-1] == pytest.approx(
        one.history_["elbo_validation"][-1], abs=1.0)
    # the weights came back to this process: its own evaluation agrees with the history
    assert abs(two.get_elbo(indices=two.validation_indices) + two.history_["elbo_validation"][-1]) < 1.0


# --------------------------------------------------------------- small parts --
def test_split_gives_every_rank_whole_minibatches(store):
    for n, ws, bs in [(1001, 2, 64), (1000, 4, 62), (999, 3, 128), (11, 2, 4)]:
        train, val, _ = split(n, 0.9, None, bs, seed=0, world_size=ws)
        assert len(train) % ws == 0 and len(train) + len(val) == n
        assert not np.intersect1d(train, val).size
        rest = (len(train) // ws) % bs
        assert rest == 0 or rest >= 3  # BatchNorm never sees a 1- or 2-cell minibatch
    a, b = split(1000, 0.9, None, 64, seed=0), split(1000, 0.9, None, 64, seed=0, world_size=1)
    np.testing.assert_array_equal(a[0], b[0])


def test_shard_range_covers_rows_once():
    """The one sharding rule (training, validation, inference): contiguous, in rank order,
    sizes as ``np.array_split`` (what the validation split always used)."""
    for n, ws in [(10, 3), (2, 4), (0, 2), (400, 2), (7, 7), (1001, 4)]:
        ranges = [shard_range(n, r, ws) for r in range(ws)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert [hi - lo for lo, hi in ranges] == [len(p) for p in np.array_split(np.arange(n), ws)]
    with pytest.raises(ValueError, match="outside"):
        shard_range(5, 2, 2)


def test_ddp_without_a_launcher_or_devices_is_explained(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not _distributed.launched() and _distributed.is_main_process()
    with pytest.raises(RuntimeError, match="torchrun"):
        _distributed.setup("cpu")


def test_mid_epoch_checkpoint_needs_the_same_number_of_ranks(store):
    from types import SimpleNamespace

    from scvi_fast.train import Trainer

    model = scvi_fast.SCVI(str(store), **MODEL)
    loader = scvi_fast.data.CSRLoader(str(store), batch_size=BATCH)
    trainer = Trainer(model.module, loader, device="cpu", progress_bar=False)
    state = trainer.state_dict() | {"world_size": 2, "step_in_epoch": 3, "rank_rng": [None, None]}
    trainer.dist = SimpleNamespace(world_size=3, rank=0, is_main=True)
    with pytest.raises(ValueError, match="same number of ranks"):
        trainer.load_state_dict(state)
    # at an epoch boundary a different number of ranks is fine: fresh per-rank noise streams
    trainer.load_state_dict(state | {"step_in_epoch": 0})
    assert trainer.global_step == 0 and trainer.epoch == 0


def test_cli_takes_launcher_options():
    from scvi_fast.cli import build_parser

    args = build_parser().parse_args(["train", "store", "--nproc-per-node", "2", "--max-restarts", "1"])
    assert args.nproc_per_node == 2 and args.max_restarts == 1
    proc = subprocess.run([sys.executable, "-m", "scvi_fast.cli", "train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--nproc-per-node" in proc.stdout


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shares_follow_the_sharding_rule(drop_last):
    """Each rank reads from the start of its :func:`shard_range` share, all ranks the same
    number of cells: the uneven ones read on into the next share (or, with ``drop_last``,
    stop short inside their own)."""
    from scvi_fast.data import BlockShuffleSampler

    n, ws = 10, 3
    shares = []
    for r in range(ws):
        s = BlockShuffleSampler(n, batch_size=2, shuffle=False, block_size=2, rank=r,
                                world_size=ws, drop_last=drop_last)
        shares.append(np.concatenate([rows[perm] for rows, perm in s.buffers()]))
    sizes = {len(x) for x in shares}
    assert sizes == ({2} if drop_last else {4})
    for r, x in enumerate(shares):
        assert x[0] == shard_range(n, r, ws)[0]
    allrows = np.concatenate(shares)
    if drop_last:
        assert np.unique(allrows).size == allrows.size
    else:
        assert set(allrows.tolist()) == set(range(n))
