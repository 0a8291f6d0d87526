"""The long results schema of the benchmarks: rows, recording, reading back; synthetic inputs."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _common as C


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    return tmp_path


def test_result_row_summary_and_shape():
    rng = np.random.default_rng()
    values = rng.uniform(100.0, 200.0, size=11).tolist()
    row = C.result_row("train:census", "scvi_fast", "cells_per_s", "cells/s", values,
                       impl="triton", mode="store/bf16-mixed",
                       shape={"cells": 200000, "genes": 8000}, config={"lr": 1e-4, "b": [1, 2]})
    assert row["median"] == pytest.approx(np.median(values), rel=1e-6)
    assert row["p20"] == pytest.approx(np.percentile(values, 20), rel=1e-6)
    assert row["p80"] == pytest.approx(np.percentile(values, 80), rel=1e-6)
    assert row["p20"] <= row["median"] <= row["p80"] and row["n"] == 11
    assert row["shape"] == "cells=200000,genes=8000"
    assert json.loads(row["config"]) == {"lr": 1e-4, "b": [1, 2]}
    one = C.result_row("loader", "scipy", "peak_rss_mb", "MB", 417.5)
    assert one["median"] == one["p20"] == one["p80"] == 417.5 and one["n"] == 1
    empty = C.result_row("x", "y", "m", "u", [None])
    assert empty["n"] == 0 and empty["median"] == ""


def test_record_appends_stamped_rows_that_read_back(results, monkeypatch):
    monkeypatch.setenv("SCVI_FAST_GIT_SHA", "abc1234")
    C.git_sha.cache_clear()
    try:
        rng = np.random.default_rng()
        a = rng.uniform(1, 2, 5).tolist()
        C.record("t.csv", [C.result_row("w", "p", "m1", "s", a, config={"k": 1},
                                        notes="first, with a comma")], load_avg_start="0.1 0.2 0.3")
        C.record("t.csv", [C.result_row("w", "p", "m2", "x", 3.25, mode="memory/fp32")])
    finally:
        C.git_sha.cache_clear()
    with open(results / "t.csv", newline="") as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == C.RESULT_FIELDS and len(lines) == 3  # one header, appended rows
    df = C.read_results("t.csv")
    assert list(df["metric"]) == ["m1", "m2"]
    assert (df["git_sha"] == "abc1234").all()
    assert df.loc[0, "median"] == pytest.approx(np.median(a), rel=1e-6)
    assert df.loc[1, "median"] == 3.25 and df.loc[1, "mode"] == "memory/fp32"
    assert df.loc[0, "config"] == {"k": 1} and df.loc[1, "config"] == {}
    assert df.loc[0, "notes"] == "first, with a comma"
    assert df.loc[0, "load_avg"].startswith("0.1 0.2 0.3 -> ")
    assert all(df["date"].str.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"))
    assert json.loads(df.loc[0, "versions"])["numpy"] == np.__version__
    assert df.loc[0, "device"] == C.cpu_name()


def test_read_results_refuses_a_wide_file(results):
    (results / "old.csv").write_text("date,git_sha,framework,cells_per_s_median\nx,y,z,1\n")
    with pytest.raises(ValueError, match="long schema"):
        C.read_results("old.csv")


def test_results_folder_from_the_environment(tmp_path):
    code = "import _common as C; print(C.RESULTS)"
    env = dict(os.environ, SCVI_FAST_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code],
                         cwd=C.ROOT / "benchmarks", env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(tmp_path)


def test_committed_results_are_in_the_long_schema():
    for name in ("train.csv", "loader.csv", "ddp.csv", "census_model.csv", "metrics_kang.csv"):
        with open(C.ROOT / "benchmarks" / "results" / name, newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == C.RESULT_FIELDS, name
        median = C.RESULT_FIELDS.index("median")
        assert len(rows) > 1 and all(float(r[median]) == float(r[median]) for r in rows[1:]), name


def test_train_kwargs_pass_cuda_graph_only_where_accepted():
    from bench_train import train_kwargs

    def old_train(self, max_epochs=None, precision="32", allow_tf32=False):
        pass

    def new_train(self, max_epochs=None, precision="32", allow_tf32=False, cuda_graph=None):
        pass

    assert train_kwargs("32", "on", old_train) == {"precision": "32", "allow_tf32": False}
    assert train_kwargs("tf32", "off", new_train) == {"precision": "32", "allow_tf32": True,
                                                       "cuda_graph": False}
    assert train_kwargs("bf16-mixed", "auto", new_train) == {
        "precision": "bf16-mixed", "allow_tf32": False, "cuda_graph": None}
    assert train_kwargs("32", "on", new_train)["cuda_graph"] is True


def test_synthetic_store_and_h5ad_are_reused_only_with_the_same_parameters(tmp_path):
    import anndata

    from scvi_fast.data import CSRStore, synthetic_anndata

    key = (300, 40, 20, 0.2)
    h5ad = C.synthetic_h5ad(C.synthetic_path(tmp_path, *key, ".h5ad"), *key)
    store = h5ad.with_suffix(".store")
    assert store.name == "synthetic_300x40_20b_0.2.store"
    stamp = (h5ad.stat().st_mtime_ns, (store / "manifest.json").stat().st_mtime_ns)
    assert C.synthetic_h5ad(h5ad, *key) == h5ad
    assert C.synthetic_store(store, *key) == store
    assert stamp == (h5ad.stat().st_mtime_ns, (store / "manifest.json").stat().st_mtime_ns)
    ref = synthetic_anndata(300, 40, n_batches=20, n_cell_types=10, density=0.2, seed=0)
    a = anndata.read_h5ad(h5ad)
    assert (a.X != ref.X).nnz == 0
    assert list(a.obs["batch"].astype(str)) == list(ref.obs["batch"].astype(str))
    # another density: both files are made again
    C.synthetic_h5ad(h5ad, 300, 40, 20, 0.3)
    s = CSRStore.open(store)
    assert s.manifest["synthetic"]["density"] == 0.3
    assert anndata.read_h5ad(h5ad).uns["synthetic"]["density"] == 0.3


def test_gpu_suite_script_parses():
    subprocess.run(["bash", "-n", str(C.ROOT / "benchmarks" / "gpu_suite.sh")], check=True)
