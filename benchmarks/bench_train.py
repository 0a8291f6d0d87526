"""Training throughput and validation ELBO: scvi_fast against scvi-tools, side by side.

Suites (same data, architecture and hyperparameters for every framework, in one run):

* ``census``: the Census preset (8000 genes, 512/50/2, batch 1024, lr 1e-4, 20 warm-up
  epochs) on synthetic Census-shaped counts (default 50k cells, 10% non-zeros, 128 batches);
* ``kang``: scvi-tools' default shape (128/10/1, batch 128, lr 1e-3) on
  ``../shared/data/kang_ctrl_muscat.h5ad`` with ``batch_key="donor"``; also compares the final
  validation ELBO per cell (scvi-tools' ``elbo_validation``), which must agree within 1%.

Throughput is training cells/s per epoch (the training pass only; validation is timed apart),
median over the epochs after the first (warm-up) and over ``--repeats`` runs; each framework
runs in its own process, alternating, so both see the same machine state. scvi-tools rows need
a Python with scvi-tools (``--scvi-python``); without one they are skipped. Rows go to
``benchmarks/results/train.csv``.

Usage::

    python benchmarks/bench_train.py --suite census --scvi-python /path/to/scvi/python
    python benchmarks/bench_train.py --suite kang --epochs 100 --scvi-python ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common as C

FIELDS = [
    "date", "git_sha", "device", "load_avg", "suite", "framework", "impl", "source", "n_cells",
    "n_genes", "n_batches", "density", "n_hidden", "n_latent", "n_layers", "batch_size", "lr",
    "epochs", "cells_per_s_median", "cells_per_s_p10", "cells_per_s_p90", "n_epochs_timed",
    "elbo_validation", "ratio_vs_scvi_tools", "precision", "versions", "notes",
]

SUITES = {
    "census": {"n_hidden": 512, "n_latent": 50, "n_layers": 2, "batch_size": 1024, "lr": 1e-4,
               "n_epochs_kl_warmup": 20, "epochs": 3},
    "kang": {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "batch_size": 128, "lr": 1e-3,
             "n_epochs_kl_warmup": 400, "epochs": 100},
}


# ------------------------------------------------------------------------------ workers
def _worker_scvi_fast(a) -> dict:
    import anndata
    import torch

    import scvi_fast

    if a.source == "store":
        data = a.store
    else:
        data = anndata.read_h5ad(a.data)
        scvi_fast.SCVI.setup_anndata(data, batch_key=a.batch_key)
    model = scvi_fast.SCVI(data, n_hidden=a.n_hidden, n_latent=a.n_latent, n_layers=a.n_layers,
                           impl=a.impl, seed=a.seed)
    t0 = time.perf_counter()
    model.train(max_epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                n_epochs_kl_warmup=a.n_epochs_kl_warmup, train_size=0.9, seed=a.seed,
                device=a.device, progress_bar=False, precision=a.precision,
                allow_tf32=a.precision == "tf32")
    wall = time.perf_counter() - t0
    n_train = len(model.train_indices)
    return {"epoch_times": model.trainer.epoch_times, "cells_per_epoch": n_train,
            "elbo_validation": model.history_["elbo_validation"][-1], "wall_s": wall,
            "impl": scvi_fast.functional.resolve_impl(a.impl, torch.device(model.device))}


def _worker_scvi_tools(a) -> dict:
    import anndata
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        """Training-pass time per epoch: first batch start to last batch end."""

        def __init__(self):
            self.times, self.cells = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()
            self.n += int(batch["X"].shape[0])

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(self.t1 - self.t0)
            self.cells.append(self.n)

    scvi.settings.seed = a.seed
    ad = anndata.read_h5ad(a.data)
    scvi.model.SCVI.setup_anndata(ad, batch_key=a.batch_key)
    # scvi-tools defaults to ZINB; scvi_fast is scVI with the NB likelihood (as the Census model)
    model = scvi.model.SCVI(ad, n_hidden=a.n_hidden, n_latent=a.n_latent, n_layers=a.n_layers,
                            gene_likelihood="nb")
    timer = EpochTimer()
    t0 = time.perf_counter()
    if a.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    model.train(max_epochs=a.epochs, batch_size=a.batch_size, train_size=0.9,
                accelerator="gpu" if a.device.startswith("cuda") else "cpu", devices=1,
                plan_kwargs={"lr": a.lr, "n_epochs_kl_warmup": a.n_epochs_kl_warmup},
                callbacks=[timer], enable_progress_bar=False, check_val_every_n_epoch=1,
                **({"precision": "bf16-mixed"} if a.precision == "bf16-mixed" else {}))
    wall = time.perf_counter() - t0
    return {"epoch_times": timer.times, "cells_per_epoch": timer.cells[-1],
            "elbo_validation": float(model.history["elbo_validation"].iloc[-1, 0]),
            "wall_s": wall, "impl": "scvi-tools"}


def worker(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--framework", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--store")
    p.add_argument("--source", default="memory")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--impl", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32")
    p.add_argument("--seed", type=int, default=0)
    for k in ("n_hidden", "n_latent", "n_layers", "batch_size", "epochs", "n_epochs_kl_warmup"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, dest=k)
    p.add_argument("--lr", type=float)
    a = p.parse_args(argv)
    res = _worker_scvi_fast(a) if a.framework == "scvi_fast" else _worker_scvi_tools(a)
    print(json.dumps(res))


# ------------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="census")
    p.add_argument("--n-cells", type=int, default=50_000)
    p.add_argument("--n-genes", type=int, default=8000)
    p.add_argument("--n-batches", type=int, default=128)
    p.add_argument("--density", type=float, default=0.10)
    p.add_argument("--epochs", type=int, help="epochs per run (the first is a warm-up)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--impls", default="auto,torch", help="scvi_fast back-ends to time")
    p.add_argument("--sources", default="memory", help="memory,store: where scvi_fast reads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "tf32", "bf16-mixed"])
    p.add_argument("--scvi-python", default=None, help="Python with scvi-tools installed")
    p.add_argument("--workdir", default="/tmp/scvi_fast_bench")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--notes", default="")
    a = p.parse_args(argv)
    s = dict(SUITES[a.suite])
    if a.epochs:
        s["epochs"] = a.epochs
    work = Path(a.workdir)
    if a.suite == "kang":
        data = C.ROOT.parent / "shared" / "data" / "kang_ctrl_muscat.h5ad"
        if not data.exists():
            sys.exit(f"{data} not found (../shared/data is needed for the kang suite)")
        batch_key, n_cells, n_genes, n_batches, density = "donor", 12261, 1287, 8, None
    else:
        data = C.synthetic_h5ad(
            work / f"synthetic_{a.n_cells}x{a.n_genes}_{a.n_batches}b_{a.density}.h5ad",
            a.n_cells, a.n_genes, a.n_batches, a.density)
        batch_key, n_cells, n_genes, n_batches, density = "batch", a.n_cells, a.n_genes, \
            a.n_batches, a.density
    store = None
    sources = a.sources.split(",")
    if "store" in sources:
        from scvi_fast.data import CSRStore

        store = work / (data.stem + ".store")
        if not store.exists():
            CSRStore.create(store, str(data), batch_key=batch_key)
    scvi_python = a.scvi_python or sys.executable
    have_scvi = C.has_module(scvi_python, "scvi")
    if not have_scvi:
        print(f"scvi-tools not importable by {scvi_python}: its rows are skipped", flush=True)

    cases = [("scvi_fast", impl, src) for impl in a.impls.split(",") for src in sources]
    if have_scvi:
        cases.append(("scvi_tools", "scvi-tools", "memory"))
    common = ["--data", str(data), "--batch-key", batch_key, "--device", a.device,
              "--precision", a.precision]
    for k in ("n_hidden", "n_latent", "n_layers", "batch_size", "epochs", "n_epochs_kl_warmup"):
        common += [f"--{k.replace('_', '-')}", str(s[k])]
    common += ["--lr", str(s["lr"])]
    results: dict[tuple, list] = {c: [] for c in cases}
    load_start = C.load_avg()
    for r in range(a.repeats):
        for case in cases:
            fw, impl, src = case
            args = common + ["--framework", fw, "--impl", impl, "--source", src,
                             "--seed", str(r)]
            if store is not None:
                args += ["--store", str(store)]
            py = scvi_python if fw == "scvi_tools" else sys.executable
            print(f"[repeat {r}] {fw} {impl} {src} ...", flush=True)
            res = C.run_worker(py, __file__, args, a.timeout)
            rates = [res["cells_per_epoch"] / t for t in res["epoch_times"][1:]]
            res["rates"] = rates
            results[case].append(res)
            print(f"    cells/s per epoch {['%.0f' % x for x in rates]}, elbo_validation "
                  f"{res['elbo_validation']:.3f}, back-end {res['impl']}", flush=True)

    ref = results.get(("scvi_tools", "scvi-tools", "memory"))
    ref_rate = C.spread([x for r in ref for x in r["rates"]])["median"] if ref else None
    rows = []
    base = {"date": C.now(), "git_sha": C.git_sha(), "device": C.device_name(a.device),
            "load_avg": f"{load_start} -> {C.load_avg()}", "suite": a.suite,
            "n_cells": n_cells, "n_genes": n_genes, "n_batches": n_batches, "density": density,
            "n_hidden": s["n_hidden"], "n_latent": s["n_latent"], "n_layers": s["n_layers"],
            "batch_size": s["batch_size"], "lr": s["lr"], "epochs": s["epochs"],
            "precision": a.precision, "notes": a.notes}
    print(f"\n{'framework':<11} {'impl':<11} {'source':<7} {'cells/s':>9} {'p10':>8} {'p90':>8} "
          f"{'ratio':>6} {'elbo_val':>10}")
    for (fw, impl, src), runs in results.items():
        st = C.spread([x for r in runs for x in r["rates"]])
        elbo = C.spread([r["elbo_validation"] for r in runs])["median"]
        ratio = st["median"] / ref_rate if ref_rate else float("nan")
        rows.append(dict(base, framework=fw, impl=runs[0]["impl"], source=src,
                         cells_per_s_median=round(st["median"], 1),
                         cells_per_s_p10=round(st["p10"], 1), cells_per_s_p90=round(st["p90"], 1),
                         n_epochs_timed=st["n"], elbo_validation=round(elbo, 4),
                         ratio_vs_scvi_tools=round(ratio, 3) if ref_rate else "",
                         versions=C.versions(scvi_python if fw == "scvi_tools" else sys.executable)))
        print(f"{fw:<11} {runs[0]['impl']:<11} {src:<7} {st['median']:>9.0f} {st['p10']:>8.0f} "
              f"{st['p90']:>8.0f} {ratio:>6.2f} {elbo:>10.3f}")
    if ref:
        ref_elbo = C.spread([r["elbo_validation"] for r in ref])["median"]
        for row in rows:
            if row["framework"] == "scvi_fast":
                rel = abs(row["elbo_validation"] - ref_elbo) / abs(ref_elbo)
                print(f"validation ELBO {row['impl']}/{row['source']}: {row['elbo_validation']:.3f}"
                      f" vs scvi-tools {ref_elbo:.3f} ({rel:.2%} apart)")
    path = C.append_rows("train.csv", rows, FIELDS)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1:])
    else:
        main()
