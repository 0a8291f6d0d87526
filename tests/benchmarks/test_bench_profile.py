"""``benchmarks/profile_step.py`` on a tiny model, in a subprocess (the CPU report)."""

import os
import subprocess
import sys

import _common as C


def test_profile_step_cpu_report(tmp_path, monkeypatch):
    env = dict(os.environ, SCVI_FAST_RESULTS=str(tmp_path / "results"))
    proc = subprocess.run(
        [sys.executable, str(C.ROOT / "benchmarks" / "profile_step.py"), "--device", "cpu",
         "--n-genes", "60", "--n-batches", "3", "--n-hidden", "16", "--n-latent", "4",
         "--n-layers", "1", "--batch-size", "32", "--steps-per-epoch", "2",
         "--embed-batch-size", "32", "--batches", "2", "--out", str(tmp_path / "out"),
         "--workdir", str(tmp_path / "work")],
        cwd=C.ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "profile_cpu.txt").read_text()
    for phase in ("train_step", "embed_batch"):
        assert f"== {phase}: marginal per step" in report
    assert "ops that would synchronise a GPU with the host" in report
    assert "aten::addmm" in report or "aten::mm" in report  # the dense layers were profiled
    monkeypatch.setattr(C, "RESULTS", tmp_path / "results")
    df = C.read_results("profile.csv")
    got = df.set_index(["what", "metric"])["median"]
    for phase in ("profile:train_step", "profile:embed_batch"):
        # a training step runs a forward, a backward and an optimiser update: dozens of ops
        assert got[(phase, "aten_ops_per_step")] >= 10
        assert 1 <= got[(phase, "compute_ops_per_step")] <= got[(phase, "aten_ops_per_step")]
        assert got[(phase, "sync_ops_per_step")] >= 0
    assert got[("profile:train_step", "compute_ops_per_step")] > \
        got[("profile:embed_batch", "compute_ops_per_step")]
