"""Same science: scvi_fast and scvi-tools trained alike over several seeds on real labelled data.

Both scVI implementations train with scvi-tools' default shape and recipe (n_hidden 128,
n_latent 10, 1 layer, dropout 0.1, batch 128, lr 1e-3, Adam eps 0.01, weight decay 1e-6, 90/10
split, KL warm-up over 400 epochs, ``--epochs`` epochs), the same likelihood on both sides
(``--gene-likelihood``: ``nb`` by default, ``zinb`` is scvi-tools' default) and, by default, no
batch key (one batch), for
each of ``--seeds`` (the seed fixes the split, the initial weights and the shuffling on each
side; the two sides use the same split for the same seed). Per run it records:

* ``val_neg_elbo``: the mean over the validation cells of ``reconstruction loss + KL`` (lower is
  better), by each side's own ``get_elbo``; for scvi-tools also ``val_neg_elbo_xeval``, its
  trained weights loaded into scvi_fast and evaluated there (a check that both evaluate alike);
* ``leiden_nmi`` / ``leiden_ari`` / ``silhouette_label`` of the posterior means
  (``get_latent_representation()``) against the data set's labels, computed by
  :mod:`scvi_fast.metrics` with the same graph for both sides (15-NN UMAP connectivities,
  Leiden resolutions 0.1..2.0, Leiden seed 0);
* the training time (a shared machine: indicative only).

Then, per data set and metric, the mean and standard deviation over seeds of each side and
two tests of "the means differ": Welch's t-test and an exact permutation test of the
difference of means (every split of the pooled per-seed values). Runs are cached under
``--work`` (``<data>/<side>[_<tag>]_e<epochs>_s<seed>/``), so an interrupted sweep resumes
and ``--tag`` reruns one side after a change while reusing the other's runs. ``--record``
appends the per-seed values and the tests to ``benchmarks/results/fidelity.csv`` (long
schema). scvi-tools runs in a subprocess of its own virtualenv (``--scvi-python``).

    nice -n 19 python benchmarks/bench_fidelity.py --data kang scdcc_pbmc4k --epochs 100 \\
        --seeds 0 1 2 3 --record
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C

DATA_DIR = C.ROOT.parent / "shared" / "data"
#: name -> file, label key, batch key (None: one batch, as the question was asked)
DATASETS = {
    "kang": ("kang_ctrl_muscat.h5ad", "cell_type", None),
    "kang_donor": ("kang_ctrl_muscat.h5ad", "cell_type", "donor"),
    "scdcc_pbmc4k": ("scdcc_10x_pbmc_4k.h5ad", "label", None),
}
SIDES = ("scvi_fast", "scvi-tools")
METRICS = ("val_neg_elbo", "leiden_nmi", "leiden_ari", "silhouette_label")

#: one scvi-tools training run; argv[1] is a JSON spec (see :func:`run_scvi_tools`)
SCVI_TOOLS_WORKER = r"""
import json, sys, time
import anndata, numpy as np, scvi, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
scvi.settings.seed = spec["seed"]
adata = anndata.read_h5ad(spec["data"])
scvi.model.SCVI.setup_anndata(adata, batch_key=spec["batch_key"])
model = scvi.model.SCVI(adata, gene_likelihood=spec.get("gene_likelihood", "nb"))
t0 = time.perf_counter()
model.train(max_epochs=spec["epochs"], batch_size=spec.get("batch_size", 128), accelerator="cpu",
            enable_progress_bar=False)
dt = time.perf_counter() - t0
out = spec["out"]
np.save(out + "/latent.npy", model.get_latent_representation())
np.save(out + "/validation_indices.npy", np.asarray(model.validation_indices))
info = {"train_time_s": dt, "version": scvi.__version__, "torch": torch.__version__}
if len(model.validation_indices):
    info["val_neg_elbo"] = -float(model.get_elbo(indices=model.validation_indices))  # it returns the ELBO
if spec.get("save_model"):
    model.save(out + "/model", overwrite=True)
json.dump(info, open(out + "/info.json", "w"))
"""


def run_scvi_tools(python: str, spec: dict) -> tuple[np.ndarray, dict]:
    """Train scvi-tools in ``python`` with ``spec`` (``data``, ``batch_key``, ``epochs``,
    ``seed``, ``threads``, optional ``batch_size`` and ``save_model``) and return its latent
    means and info (``train_time_s``, ``version``, ``torch``, ``val_neg_elbo``). Files go to
    ``spec["out"]`` (a temporary folder when it is not given)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"out": tmp} | spec
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        script = Path(tmp) / "train_scvi_tools.py"
        script.write_text(SCVI_TOOLS_WORKER)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run([python, str(script), json.dumps(spec)], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"scvi-tools run failed:\n{proc.stderr[-3000:]}")
        out = Path(spec["out"])
        return np.load(out / "latent.npy"), json.loads((out / "info.json").read_text())


def run_scvi_fast(adata, batch_key, epochs: int, seed: int, out: Path,
                  gene_likelihood: str = "nb") -> dict:
    import scvi_fast

    scvi_fast.SCVI.setup_anndata(adata, batch_key=batch_key)
    # the same likelihood on both sides (--gene-likelihood); the seed fixes the initial
    # weights, as scvi.settings.seed does
    model = scvi_fast.SCVI(adata, gene_likelihood=gene_likelihood, seed=seed)
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, seed=seed, progress_bar=False)
    info = {"train_time_s": time.perf_counter() - t0, "version": scvi_fast.__version__,
            "block_size": model.trainer.train_loader.sampler.block_size,
            "buffer_size": model.trainer.train_loader.sampler.buffer_size}
    np.save(out / "latent.npy", model.get_latent_representation())
    np.save(out / "validation_indices.npy", np.asarray(model.validation_indices))
    if len(model.validation_indices):
        info["val_neg_elbo"] = -model.get_elbo(indices=model.validation_indices)
    return info


def cross_evaluate(model_dir: Path, adata, val_idx: np.ndarray) -> float:
    """scvi-tools' trained weights evaluated by scvi_fast: mean validation ``rec + KL``."""
    import scvi_fast

    model = scvi_fast.SCVI.load(model_dir, adata=adata)
    return -model.get_elbo(indices=val_idx)


def embedding_metrics(z: np.ndarray, labels: np.ndarray) -> dict:
    """Leiden NMI / ARI (scib's sweep on the 15-NN UMAP graph) and the label silhouette."""
    from scvi_fast import metrics

    cl = metrics.leiden_nmi_ari(z, labels, seed=0)
    return {"leiden_nmi": cl["leiden_nmi"], "leiden_ari": cl["leiden_ari"],
            "leiden_resolution": cl["resolution"],
            "silhouette_label": metrics.silhouette_label(z, labels)}


def permutation_p(a, b) -> float:
    """Two-sided exact permutation p-value of ``mean(a) - mean(b)`` over every split of the
    pooled values into groups of ``len(a)`` and ``len(b)``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    pooled, na = np.concatenate([a, b]), a.size
    observed = abs(a.mean() - b.mean())
    diffs = []
    for idx in itertools.combinations(range(pooled.size), na):
        mask = np.zeros(pooled.size, bool)
        mask[list(idx)] = True
        diffs.append(abs(pooled[mask].mean() - pooled[~mask].mean()))
    return float(np.mean(np.asarray(diffs) >= observed - 1e-12))


def compare(a, b, pairs=None) -> dict:
    """Means, standard deviations and the tests of ``a`` (scvi_fast) against ``b`` (scvi-tools);
    with ``pairs`` (``(a_i, b_i)`` of the seeds both sides ran: the same train/validation split)
    also the paired t-test of the per-seed differences."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    out = {"mean_a": a.mean(), "sd_a": a.std(ddof=1) if a.size > 1 else math.nan,
           "mean_b": b.mean(), "sd_b": b.std(ddof=1) if b.size > 1 else math.nan,
           "diff": a.mean() - b.mean(), "welch_p": math.nan, "perm_p": math.nan,
           "paired_n": 0, "paired_diff": math.nan, "paired_p": math.nan}
    if a.size > 1 and b.size > 1:
        out["welch_p"] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        out["perm_p"] = permutation_p(a, b)
    if pairs is not None and len(pairs) > 1:
        pa, pb = np.asarray(pairs, float).T
        out |= {"paired_n": len(pairs), "paired_diff": float(np.mean(pa - pb)),
                "paired_p": float(stats.ttest_rel(pa, pb).pvalue)}
    return {k: float(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["kang", "scdcc_pbmc4k"], choices=sorted(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gene-likelihood", default="nb", choices=["nb", "zinb", "poisson"],
                    help="the likelihood of both sides (zinb: scvi-tools' default); run folders "
                    "of another than nb carry its name")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--tag", default="", help="suffix of scvi_fast's run folders (a rerun after "
                    "a change keeps the earlier runs)")
    ap.add_argument("--scvi-python", default="/work/venvs/fidelity/bin/python",
                    help="python of a virtualenv with scvi-tools 1.4.2")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "scvi_fast_fidelity"),
                    help="cache of the runs (latents, info)")
    ap.add_argument("--data-dir", default=str(DATA_DIR), help="folder of the .h5ad files")
    ap.add_argument("--record", action="store_true", help="append rows to results/fidelity.csv")
    args = ap.parse_args(argv)

    import anndata
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    results: dict = {}  # (data, side) -> list of per-seed dicts
    for seed, name in itertools.product(args.seeds, args.data):
        fname, label_key, batch_key = DATASETS[name]
        path = Path(args.data_dir) / fname
        if not path.exists():
            print(f"{path} not found (../shared/data sits beside the repository; see "
                  "--data-dir)", file=sys.stderr)
            return 1
        for side in args.sides:
            folder = side + (f"_{args.tag}" if args.tag and side == "scvi_fast" else "")
            if args.gene_likelihood != "nb":
                folder += f"_{args.gene_likelihood}"
            out = work / name / f"{folder}_e{args.epochs}_s{seed}"
            info_path = out / "run.json"
            if not info_path.exists():
                out.mkdir(parents=True, exist_ok=True)
                adata = anndata.read_h5ad(path)
                if side == "scvi_fast":
                    info = run_scvi_fast(adata, batch_key, args.epochs, seed, out,
                                         args.gene_likelihood)
                else:
                    spec = {"data": str(path), "batch_key": batch_key, "epochs": args.epochs,
                            "gene_likelihood": args.gene_likelihood,
                            "seed": seed, "threads": args.threads, "out": str(out),
                            "save_model": True}
                    _, info = run_scvi_tools(args.scvi_python, spec)
                    val_idx = np.load(out / "validation_indices.npy")
                    info["val_neg_elbo_xeval"] = cross_evaluate(out / "model", adata, val_idx)
                labels = adata.obs[label_key].astype(str).to_numpy()
                info |= embedding_metrics(np.load(out / "latent.npy"), labels)
                info_path.write_text(json.dumps(info, indent=1))
            info = json.loads(info_path.read_text())
            info["seed"] = seed
            results.setdefault((name, side), []).append(info)
            print(f"{name:13s} {side:10s} seed {seed}: " + " ".join(
                f"{k}={info[k]:.4f}" for k in (*METRICS, "val_neg_elbo_xeval", "train_time_s")
                if k in info), flush=True)

    rows, table = [], []
    for name in args.data:
        fname, label_key, batch_key = DATASETS[name]
        config = {"data": fname, "label_key": label_key, "batch_key": batch_key,
                  "gene_likelihood": args.gene_likelihood,
                  "epochs": args.epochs, "batch_size": 128, "threads": args.threads,
                  "tag": args.tag, "recipe": "scvi-tools defaults, NB likelihood"}
        runs = {side: results.get((name, side), []) for side in SIDES}
        for side, rs in runs.items():
            notes = (f"scvi-tools {rs[0]['version']} (torch {rs[0]['torch']})"
                     if side == "scvi-tools" and rs else f"scvi_fast {rs[0]['version']}" if rs else "")
            for metric in (*METRICS, "val_neg_elbo_xeval", "train_time_s"):
                vals = [r[metric] for r in rs if metric in r]
                if vals:
                    rows.append(C.result_row(
                        f"fidelity:{name}", side, metric, "s" if metric == "train_time_s" else "",
                        vals, mode="per_seed", config=config | {
                            "seeds": [r["seed"] for r in rs if metric in r], "values": vals},
                        notes=notes))
        if runs["scvi_fast"] and runs["scvi-tools"]:
            for metric in METRICS:
                a = [r[metric] for r in runs["scvi_fast"]]
                b = [r[metric] for r in runs["scvi-tools"]]
                by_seed = {r["seed"]: r[metric] for r in runs["scvi-tools"]}
                pairs = [(r[metric], by_seed[r["seed"]]) for r in runs["scvi_fast"]
                         if r["seed"] in by_seed]
                cmp = compare(a, b, pairs)
                table.append({"data": name, "metric": metric, "n_a": len(a), "n_b": len(b), **cmp})
                rows.append(C.result_row(f"fidelity:{name}", "scvi_fast-scvi-tools", metric, "",
                                         cmp["diff"], mode="mean_difference",
                                         config=config | cmp | {"n_a": len(a), "n_b": len(b)}))
    if table:
        print("\nscvi_fast (a) vs scvi-tools (b): mean, sd over seeds; Welch and exact "
              "permutation p of the difference of means; paired t-test over the seeds both ran")
        for t in table:
            print(f"{t['data']:13s} {t['metric']:16s} a {t['mean_a']:9.4f} +- {t['sd_a']:.4f} "
                  f"(n={t['n_a']})  b {t['mean_b']:9.4f} +- {t['sd_b']:.4f} (n={t['n_b']})  "
                  f"diff {t['diff']:+.4f}  welch p {t['welch_p']:.3f}  perm p {t['perm_p']:.3f}  "
                  f"paired (n={t['paired_n']:.0f}) {t['paired_diff']:+.4f} p {t['paired_p']:.3f}")
    if args.record and rows:
        path = C.record("fidelity.csv", rows, device="cpu")
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
