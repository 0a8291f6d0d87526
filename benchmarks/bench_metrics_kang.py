"""Integration metrics on Kang et al. 2018 control PBMCs: scvi_fast vs scvi-tools vs PCA.

Both scVI implementations are trained with the same settings (scvi-tools' defaults:
n_hidden 128, n_latent 10, 1 layer, batch 128, lr 1e-3, 90/10 split, KL warm-up 400 epochs,
``--epochs`` epochs, seed 0) on ``kang_ctrl_muscat.h5ad`` with ``batch = donor``; the
floor is the top 50 principal components of log-normalised counts (1e4 per cell, log1p).
Each embedding goes through ``scvi_fast.metrics.summary_table`` (label = ``cell_type``).
scvi-tools runs in a subprocess of its own virtualenv (``--scvi-python``).

Appends one dated row per metric and method to ``metrics_kang.csv`` (long schema: ``provider``
the method, ``mode`` the metric's kind, ``bio`` / ``batch`` / ``info``; training times as
``train_time_s``), with device, versions and git sha, and writes ``metrics_kang.png`` to
``--out``.

    python benchmarks/bench_metrics_kang.py --epochs 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C

DATA = C.ROOT.parent / "shared" / "data" / "kang_ctrl_muscat.h5ad"

SCVI_TOOLS_SCRIPT = r"""
import json, sys, time
import anndata, numpy as np, scvi, torch
path, out, epochs, seed, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
scvi.settings.seed = seed
adata = anndata.read_h5ad(path)
scvi.model.SCVI.setup_anndata(adata, batch_key="donor")
model = scvi.model.SCVI(adata, gene_likelihood="nb")  # scvi_fast models NB counts
t0 = time.perf_counter()
model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
dt = time.perf_counter() - t0
np.save(out + "/latent.npy", model.get_latent_representation())
elbo = model.history["elbo_validation"].iloc[-1, 0] if "elbo_validation" in model.history else float("nan")
json.dump({"train_time_s": dt, "version": scvi.__version__, "torch": torch.__version__,
           "elbo_validation": float(elbo)}, open(out + "/info.json", "w"))
"""


def pca_floor(adata, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """Top principal components of log1p(counts normalised to 1e4 per cell)."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    X = adata.X
    lib = np.asarray(X.sum(1)).ravel()
    Xn = sp.diags(1e4 / lib) @ X if sp.issparse(X) else X * (1e4 / lib)[:, None]
    Xn = np.log1p(Xn.toarray() if sp.issparse(Xn) else Xn)
    return PCA(n_components=n_comps, random_state=seed).fit_transform(Xn)


def run_scvi_tools(python: str, epochs: int, seed: int, threads: int) -> tuple[np.ndarray, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "train_scvi_tools.py"
        script.write_text(SCVI_TOOLS_SCRIPT)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run([python, str(script), str(DATA), tmp, str(epochs), str(seed), str(threads)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"scvi-tools run failed:\n{proc.stderr[-3000:]}")
        return np.load(Path(tmp) / "latent.npy"), json.loads((Path(tmp) / "info.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scvi-python", default="/work/venv-scvi/bin/python",
                    help="python of a virtualenv with scvi-tools ('' to skip it)")
    ap.add_argument("--max-cells", type=int, default=None, help="evaluate metrics on a random subset")
    ap.add_argument("--leiden-iterations", type=int, default=-1,
                    help="Leiden passes per resolution (-1: until stable, as scib)")
    ap.add_argument("--out", default=str(C.RESULTS), help="folder of metrics_kang.png")
    args = ap.parse_args(argv)

    import anndata
    import torch

    import scvi_fast
    from scvi_fast import metrics

    if not DATA.exists():
        print(f"{DATA} not found (../shared/data sits beside the repository)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    adata = anndata.read_h5ad(DATA)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    batch = adata.obs["donor"].astype(str).to_numpy()
    embeddings, train_time, notes = {}, {}, {}

    scvi_fast.SCVI.setup_anndata(adata, batch_key="donor")
    model = scvi_fast.SCVI(adata, gene_likelihood="nb")  # the scvi-tools side's model
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, seed=args.seed, progress_bar=False)
    train_time["scvi_fast"] = time.perf_counter() - t0
    embeddings["scvi_fast"] = model.get_latent_representation()
    notes["scvi_fast"] = f"scvi_fast {scvi_fast.__version__}"
    print(f"scvi_fast: {args.epochs} epochs in {train_time['scvi_fast']:.1f} s", flush=True)

    if args.scvi_python:
        t0 = time.perf_counter()
        z, info = run_scvi_tools(args.scvi_python, args.epochs, args.seed, args.threads)
        embeddings["scvi-tools"] = z
        train_time["scvi-tools"] = info["train_time_s"]
        notes["scvi-tools"] = f"scvi-tools {info['version']} (torch {info['torch']})"
        print(f"scvi-tools: {args.epochs} epochs in {info['train_time_s']:.1f} s "
              f"(subprocess {time.perf_counter() - t0:.1f} s)", flush=True)

    embeddings["pca"] = pca_floor(adata, seed=args.seed)
    train_time["pca"] = float("nan")
    notes["pca"] = "PCA(50) of log1p(1e4-normalised counts)"

    t0 = time.perf_counter()
    table = metrics.summary_table(embeddings, labels, batch, max_cells=args.max_cells, seed=args.seed,
                                  leiden_iterations=args.leiden_iterations)
    t_metrics = time.perf_counter() - t0
    table.loc["train_time_s"] = ["info", *[train_time[c] for c in embeddings]]
    table.loc["embedding_dims"] = ["info", *[float(embeddings[c].shape[1]) for c in embeddings]]
    config = {"data": DATA.name, "label_key": "cell_type", "batch_key": "donor",
              "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
              "max_cells": args.max_cells, "leiden_iterations": args.leiden_iterations}
    shape = {"cells": adata.n_obs, "genes": adata.n_vars}
    rows = [C.result_row("metrics:kang", method, metric, "s" if metric == "train_time_s" else "",
                         float(table.loc[metric, method]), mode=table.loc[metric, "kind"],
                         shape=shape, config=config, notes=notes[method])
            for metric in table.index for method in embeddings]
    path = C.record("metrics_kang.csv", rows, device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"metrics in {t_metrics:.1f} s; appended {len(rows)} rows to {path}", flush=True)
    png = metrics.plot_summary(embeddings, labels, batch, table.drop(["train_time_s", "embedding_dims"]),
                               out / "metrics_kang.png", seed=args.seed)
    print(f"wrote {png}; total {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
