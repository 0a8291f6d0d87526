"""``scvi-fast``: every user error exits 2 with one line and no traceback; nothing is lost."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scvi_fast
from scvi_fast.cli import build_parser, main
from scvi_fast.data import CSRStore, synthetic_anndata, write_h5ad

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_MODEL = ROOT / "tests" / "fixtures" / "scvi_tools_models" / "default"


def _fails(capsys, argv, *match):
    """Run ``argv``; it must return 2 and print one line to stderr holding every ``match``."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for m in match:
        assert m in err, err
    return err


@pytest.fixture
def h5ad(tmp_path):
    ad = synthetic_anndata(n_cells=120, n_genes=30, n_batches=2, n_cell_types=2, seed=3)
    ad = ad[np.asarray(ad.X.sum(axis=1)).ravel() > 0].copy()
    write_h5ad(ad, tmp_path / "a.h5ad")
    return tmp_path / "a.h5ad"


def _ordinary_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("keep me")
    (path / "config.json").write_text('{"something": "else"}')
    return path


def _intact(path: Path) -> bool:
    return sorted(p.name for p in path.iterdir()) == ["config.json", "notes.txt"] and (
        (path / "notes.txt").read_text() == "keep me")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"scvi-fast {scvi_fast.__version__}"


def test_every_flag_has_help():
    def walk(parser, where):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{where} {name}")
            yield where, action

    missing = [f"{where}: {a.option_strings or a.dest}" for where, a in walk(build_parser(),
                                                                             "scvi-fast")
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing


@pytest.mark.parametrize("argv, match", [
    (["train", "--batch-size", "0"], "--batch-size: 0 is not positive"),
    (["train", "--batch-size", "-5"], "--batch-size: -5 is not positive"),
    (["train", "--n-hidden", "0"], "--n-hidden: 0 is not positive"),
    (["train", "--n-latent", "0"], "--n-latent: 0 is not positive"),
    (["train", "--n-layers", "0"], "--n-layers: 0 is not positive"),
    (["train", "--max-epochs", "0"], "--max-epochs: 0 is not positive"),
    (["train", "--max-epochs", "-1"], "--max-epochs: -1 is not positive"),
    (["train", "--max-epochs", "two"], "'two' is not a whole number"),
    (["train", "--lr", "nan"], "--lr: nan is not a positive number"),
    (["train", "--n-cells", "0"], "--n-cells: 0 is not positive"),
    (["train", "--seed", "-1"], "--seed: -1 is not 0 or more"),
    (["train", "--device", "foo"], "unknown device 'foo'"),
    (["train", "--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["embed", "m", "x.h5ad", "--out", "z.npy", "--batch-size", "0"], "0 is not positive"),
    (["evaluate", "x.h5ad", "--label-key", "l", "--batch-key", "b", "--out", "e",
      "--leiden-iterations", "0"], "0 passes do nothing"),
])
def test_bad_values_exit_2_before_anything_is_written(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _fails(capsys, argv + ["--out", str(tmp_path / "out")] if argv[0] == "train" else argv, match)
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_a_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(capsys, ["train", "--device", "cuda", "--out", str(tmp_path / "o")],
           "'cuda': no GPU is available here", "--device cpu or auto")
    assert not (tmp_path / "o").exists()


def test_missing_inputs(capsys, tmp_path):
    _fails(capsys, ["train", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "o")],
           "nope.h5ad does not exist")
    _fails(capsys, ["convert", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "s")],
           "nope.h5ad does not exist")
    _fails(capsys, ["embed", str(tmp_path / "m"), "x.h5ad", "--out", str(tmp_path / "z.npy")],
           "model folder", "does not exist")
    _fails(capsys, ["train", str(ROOT / "README.md"), "--out", str(tmp_path / "o")],
           "unsupported input")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_unwritable_output(capsys, tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "out"
    else:
        # sysfs refuses new entries even to root (a chmod'ed folder does not stop root)
        if not Path("/sys/kernel").is_dir():
            pytest.skip("needs Linux sysfs")
        out = Path("/sys/kernel/scvi_fast_out")
    _fails(capsys, ["train", "--n-cells", "50", "--out", str(out)], "cannot write to --out")


def _fake_native_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"format": "scvi_fast"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_train_refuses_to_replace_results_or_other_folders(capsys, tmp_path):
    out = tmp_path / "run"
    _fake_native_model(out / "model")
    _fails(capsys, ["train", "--n-cells", "50", "--out", str(out)],
           "holds the output of an earlier run (model)", "--resume", "--overwrite")
    other = tmp_path / "run2"
    _ordinary_folder(other / "model")
    _fails(capsys, ["train", "--n-cells", "50", "--overwrite", "--out", str(other)],
           "model exists and is not a model folder", "Nothing was deleted")
    assert _intact(other / "model")
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "adata_scvi.h5ad").mkdir()
    _fails(capsys, ["train", "--n-cells", "50", "--overwrite", "--out", str(tmp_path / "run3")],
           "adata_scvi.h5ad exists and is not a file")


def test_convert_overwrite_never_deletes_an_ordinary_folder(capsys, tmp_path, h5ad):
    folder = _ordinary_folder(tmp_path / "folder")
    _fails(capsys, ["convert", str(FIXTURE_MODEL), "--out", str(folder), "--overwrite"],
           "is not a model folder", "Nothing was deleted")
    _fails(capsys, ["convert", str(h5ad), "--out", str(folder), "--overwrite"],
           "is not a CSR store", "Nothing was deleted")
    assert _intact(folder)
    # a model folder is not a store either
    model = _fake_native_model(tmp_path / "model")
    _fails(capsys, ["convert", str(h5ad), "--out", str(model), "--overwrite"], "not a CSR store")


def test_convert_store_overwrite(capsys, tmp_path, h5ad):
    out = tmp_path / "s"
    assert main(["convert", str(h5ad), "--out", str(out), "--batch-key", "batch"]) == 0
    first = CSRStore.open(out)
    assert first.batch_key == "batch"
    _fails(capsys, ["convert", str(h5ad), "--out", str(out)], "exists; pass --overwrite")
    assert first.source_rows is None
    assert main(["convert", str(h5ad), "--out", str(out), "--overwrite", "--shuffle"]) == 0
    again = CSRStore.open(out)
    assert again.source_rows is not None and again.batch_key is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "s"]


def test_a_damaged_store_stops_training_with_one_line(capsys, tmp_path, h5ad):
    assert main(["convert", str(h5ad), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    data = tmp_path / "s" / "data.bin"
    raw = bytearray(data.read_bytes())
    for k in range(8):
        raw[len(raw) // 2 + k] ^= 0xFF
    data.write_bytes(bytes(raw))
    _fails(capsys, ["train", str(tmp_path / "s"), "--max-epochs", "1", "--quiet", "--device",
                    "cpu", "--out", str(tmp_path / "run")],
           "data.bin: chunk 0 (cells 0-", "fails its CRC-32C checksum", "Re-create the store")
    assert not (tmp_path / "run" / "model").exists()


def test_embed_refuses_an_existing_output(capsys, tmp_path, h5ad):
    (tmp_path / "z.npy").write_bytes(b"mine")
    _fails(capsys, ["embed", str(FIXTURE_MODEL), str(h5ad), "--out", str(tmp_path / "z.npy")],
           "z.npy exists; pass --overwrite")
    _fails(capsys, ["embed", str(FIXTURE_MODEL), str(h5ad), "--out", str(tmp_path / "z.csv")],
           "give a .h5ad file")
    assert (tmp_path / "z.npy").read_bytes() == b"mine"


def test_evaluate_refuses_existing_metrics(capsys, tmp_path, h5ad):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.csv").write_text("mine")
    _fails(capsys, ["evaluate", str(h5ad), "--label-key", "cell_type", "--batch-key", "batch",
                    "--out", str(tmp_path / "e")], "metrics.csv already", "--overwrite")


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scvi_fast.cli", "train", "--batch-size", "0",
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_train_with_covariates(capsys, tmp_path):
    ad = synthetic_anndata(n_cells=120, n_genes=30, n_batches=2, n_cell_types=2, seed=3)
    ad = ad[np.asarray(ad.X.sum(axis=1)).ravel() > 0].copy()
    ad.obs["score"] = np.linspace(0, 1, ad.n_obs)
    write_h5ad(ad, tmp_path / "c.h5ad")
    rc = main(["train", str(tmp_path / "c.h5ad"), "--batch-key", "batch",
               "--categorical-covariate-keys", "cell_type", "--continuous-covariate-keys",
               "score", "--encode-covariates", "--max-epochs", "1", "--quiet",
               "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    model = scvi_fast.SCVI.load(tmp_path / "o" / "model")
    assert model.registry.categorical_covariate_keys == ("cell_type",)
    assert model.registry.continuous_covariate_keys == ("score",)
    assert model.init_params_["encode_covariates"]
    _fails(capsys, ["train", str(tmp_path / "c.h5ad"), "--continuous-covariate-keys", "nope",
                    "--out", str(tmp_path / "o2")], "'nope'")


def test_covariate_options_refuse_a_store(capsys, tmp_path, h5ad):
    CSRStore.create(tmp_path / "s", h5ad, batch_key="batch")
    _fails(capsys, ["train", str(tmp_path / "s"), "--size-factor-key", "sf",
                    "--out", str(tmp_path / "o")], "need an .h5ad input")


def test_train_takes_the_model_options(capsys, tmp_path, h5ad):
    """--gene-likelihood, --dispersion, --latent-distribution and --no-observed-lib-size reach
    the model and its saved config; a store trains with a library encoder too (its prior
    computed from the store's cells)."""
    out = tmp_path / "run"
    assert main(["train", str(h5ad), "--batch-key", "batch", "--labels-key", "cell_type",
                 "--gene-likelihood", "poisson", "--dispersion", "gene-label",
                 "--latent-distribution", "ln", "--no-observed-lib-size", "--max-epochs", "1",
                 "--n-hidden", "8", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    model = scvi_fast.SCVI.load(out / "model", adata=None)
    assert {k: model.init_params_[k] for k in ("gene_likelihood", "dispersion",
                                               "latent_distribution", "use_observed_lib_size")} == {
        "gene_likelihood": "poisson", "dispersion": "gene-label", "latent_distribution": "ln",
        "use_observed_lib_size": False}
    assert model.module.library_log_means.shape == (1, 2)
    assert main(["convert", str(h5ad), "--out", str(tmp_path / "s"), "--batch-key", "batch"]) == 0
    assert main(["train", str(tmp_path / "s"), "--gene-likelihood", "zinb",
                 "--no-observed-lib-size", "--max-epochs", "1", "--n-hidden", "8", "--quiet",
                 "--device", "cpu", "--out", str(tmp_path / "run2")]) == 0
    capsys.readouterr()
    _fails(capsys, ["train", str(h5ad), "--gene-likelihood", "normal"], "--gene-likelihood")
