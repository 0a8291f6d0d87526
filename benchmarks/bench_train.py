"""Training throughput and validation ELBO: scvi_fast against scvi-tools, side by side.

Suites (same data, architecture and hyperparameters for every framework, in one run):

* ``census``: the Census preset (8000 genes, 512/50/2, batch 1024, lr 1e-4, 20 warm-up
  epochs) on synthetic Census-shaped counts (default 50k cells, 10% non-zeros, 128 batches);
  scvi_fast reads the synthetic CSR store (``--sources store``) or an in-memory AnnData
  (``memory``), scvi-tools the in-memory AnnData;
* ``kang``: scvi-tools' default shape (128/10/1, batch 128, lr 1e-3) on
  ``../shared/data/kang_ctrl_muscat.h5ad`` with ``batch_key="donor"``; also compares the final
  validation ELBO per cell (scvi-tools' ``elbo_validation``), which must agree within 1%.

Throughput is training cells/s per epoch (the training pass only; validation is timed apart),
median over the epochs after the first (warm-up) and over ``--repeats`` runs. Every precision
of ``--precisions`` (``32``, ``tf32``, ``bf16-mixed``; the last two change CUDA kernels only)
trains a fresh model in one scvi_fast process, which reports each as it finishes; scvi-tools
(``--scvi-python``; skipped without one) is the fp32 reference of every ratio, in its own
process. ``--cuda-graph auto|on|off`` is passed to ``SCVI.train(cuda_graph=...)`` when the
installed scvi_fast has that argument (``auto``: scvi_fast's default).

Rows (long schema, ``_common.RESULT_FIELDS``) are appended to ``train.csv`` as each case
completes: ``cells_per_s`` and ``elbo_validation`` per case, ``ratio_vs_scvi_tools`` once the
reference is in. ``mode`` is ``<source>/<precision>``.

Usage::

    python benchmarks/bench_train.py --suite census --scvi-python /path/to/scvi/python
    python benchmarks/bench_train.py --suite census --device cuda --precisions 32,tf32,bf16-mixed
    python benchmarks/bench_train.py --suite kang --epochs 100 --scvi-python ...
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import _common as C

SUITES = {
    "census": {"n_hidden": 512, "n_latent": 50, "n_layers": 2, "batch_size": 1024, "lr": 1e-4,
               "n_epochs_kl_warmup": 20, "epochs": 3},
    "kang": {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "batch_size": 128, "lr": 1e-3,
             "n_epochs_kl_warmup": 400, "epochs": 100},
}
ARCH_KEYS = ("n_hidden", "n_latent", "n_layers", "batch_size", "epochs", "n_epochs_kl_warmup")
PRECISION_LABEL = {"32": "fp32", "tf32": "tf32", "bf16-mixed": "bf16-mixed"}
CUDA_GRAPH = {"auto": None, "on": True, "off": False}


def train_kwargs(precision: str, cuda_graph: str, train_fn=None) -> dict:
    """``SCVI.train`` arguments of one precision; ``cuda_graph`` only where ``train_fn``
    (default ``scvi_fast.SCVI.train``) accepts it."""
    if train_fn is None:
        import scvi_fast

        train_fn = scvi_fast.SCVI.train
    kw = {"precision": "bf16-mixed" if precision == "bf16-mixed" else "32",
          "allow_tf32": precision == "tf32"}
    if "cuda_graph" in inspect.signature(train_fn).parameters:
        kw["cuda_graph"] = CUDA_GRAPH[cuda_graph]
    return kw


# ------------------------------------------------------------------------------ workers
def _worker_scvi_fast(a):
    """Train one fresh model per precision; yield each result as it is done."""
    import torch

    import scvi_fast

    if a.source == "store":
        data = a.store
    else:
        import anndata

        data = anndata.read_h5ad(a.data)
        scvi_fast.SCVI.setup_anndata(data, batch_key=a.batch_key)
    for precision in a.precisions.split(","):
        model = scvi_fast.SCVI(data, n_hidden=a.n_hidden, n_latent=a.n_latent,
                               n_layers=a.n_layers, gene_likelihood=a.gene_likelihood,
                               impl=a.impl, seed=a.seed)
        kw = train_kwargs(precision, a.cuda_graph)
        t0 = time.perf_counter()
        model.train(max_epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                    n_epochs_kl_warmup=a.n_epochs_kl_warmup, train_size=0.9, seed=a.seed,
                    device=a.device, progress_bar=False, check_val_every_n_epoch=1, **kw)
        wall = time.perf_counter() - t0
        yield {"precision": precision, "epoch_times": model.trainer.epoch_times,
               "cells_per_epoch": len(model.train_indices),
               "elbo_validation": model.history_["elbo_validation"][-1], "wall_s": wall,
               "impl": scvi_fast.functional.resolve_impl(a.impl, torch.device(model.device)),
               "cuda_graph": a.cuda_graph if "cuda_graph" in kw else "not supported"}
        del model


def _worker_scvi_tools(a):
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
    for precision in a.precisions.split(","):
        # the same likelihood on both sides (scvi-tools' own default would be ZINB)
        model = scvi.model.SCVI(ad, n_hidden=a.n_hidden, n_latent=a.n_latent,
                                n_layers=a.n_layers, gene_likelihood=a.gene_likelihood)
        timer = EpochTimer()
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        t0 = time.perf_counter()
        model.train(max_epochs=a.epochs, batch_size=a.batch_size, train_size=0.9,
                    accelerator="gpu" if a.device.startswith("cuda") else "cpu", devices=1,
                    plan_kwargs={"lr": a.lr, "n_epochs_kl_warmup": a.n_epochs_kl_warmup},
                    callbacks=[timer], enable_progress_bar=False, check_val_every_n_epoch=1,
                    **({"precision": "bf16-mixed"} if precision == "bf16-mixed" else {}))
        wall = time.perf_counter() - t0
        yield {"precision": precision, "epoch_times": timer.times,
               "cells_per_epoch": timer.cells[-1],
               "elbo_validation": float(model.history["elbo_validation"].iloc[-1, 0]),
               "wall_s": wall, "impl": "scvi-tools"}


def worker(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--framework", required=True)
    p.add_argument("--data")
    p.add_argument("--store")
    p.add_argument("--source", default="memory")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--impl", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="32")
    p.add_argument("--cuda-graph", default="auto", choices=sorted(CUDA_GRAPH))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gene-likelihood", default="nb", choices=["zinb", "nb", "poisson"])
    for k in ARCH_KEYS:
        p.add_argument(f"--{k.replace('_', '-')}", type=int, dest=k)
    p.add_argument("--lr", type=float)
    a = p.parse_args(argv)
    run = _worker_scvi_fast if a.framework == "scvi_fast" else _worker_scvi_tools
    for res in run(a):
        print(json.dumps(res), flush=True)


# ------------------------------------------------------------------------------- driver
def _data(a, work: Path, sources: list[str], want_h5ad: bool):
    """``(h5ad or None, store or None, shape)`` of the suite's data."""
    if a.suite == "kang":
        data = C.ROOT.parent / "shared" / "data" / "kang_ctrl_muscat.h5ad"
        if not data.exists():
            sys.exit(f"{data} not found (../shared/data is needed for the kang suite)")
        store = None
        if "store" in sources:
            from scvi_fast.data import CSRStore

            store = work / "kang_ctrl_muscat.store"
            if not store.exists():
                CSRStore.create(store, str(data), batch_key="donor")
        return data, store, {"cells": 12261, "genes": 1287, "batches": 8}
    shape = {"cells": a.n_cells, "genes": a.n_genes, "batches": a.n_batches,
             "density": a.density}
    key = (a.n_cells, a.n_genes, a.n_batches, a.density)
    store = C.synthetic_store(C.synthetic_path(work, *key, ".store"), *key) \
        if "store" in sources else None
    h5ad = C.synthetic_h5ad(C.synthetic_path(work, *key, ".h5ad"), *key) if want_h5ad else None
    return h5ad, store, shape


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
    p.add_argument("--precisions", default="32",
                   help="comma-separated: 32, tf32, bf16-mixed (one scvi_fast process trains "
                        "each in turn; scvi-tools runs fp32 once as the reference)")
    p.add_argument("--cuda-graph", default="auto", choices=sorted(CUDA_GRAPH),
                   help="SCVI.train(cuda_graph=None/True/False) where supported")
    p.add_argument("--scvi-python", default=None, help="Python with scvi-tools installed")
    p.add_argument("--no-scvi-tools", action="store_true", help="skip the scvi-tools reference")
    p.add_argument("--workdir", default="/tmp/scvi_fast_bench")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--notes", default="")
    p.add_argument("--gene-likelihood", default="nb", choices=["zinb", "nb", "poisson"],
                   help="gene likelihood of both frameworks' models (nb: the Census model)")
    a = p.parse_args(argv)
    precisions = a.precisions.split(",")
    for prec in precisions:
        if prec not in PRECISION_LABEL:
            p.error(f"unknown precision {prec!r}: use {', '.join(PRECISION_LABEL)}")
    s = dict(SUITES[a.suite])
    if a.epochs:
        s["epochs"] = a.epochs
    work = Path(a.workdir)
    sources = a.sources.split(",")
    scvi_python = a.scvi_python or sys.executable
    have_scvi = not a.no_scvi_tools and C.has_module(scvi_python, "scvi")
    if not have_scvi and not a.no_scvi_tools:
        print(f"scvi-tools not importable by {scvi_python}: its rows are skipped", flush=True)
    batch_key = "donor" if a.suite == "kang" else "batch"
    h5ad, store, shape = _data(a, work, sources, want_h5ad=have_scvi or "memory" in sources)

    # scvi_fast first (every precision in one process), then the scvi-tools reference
    cases = [("scvi_fast", impl, src, a.precisions) for impl in a.impls.split(",")
             for src in sources]
    if have_scvi:
        cases.append(("scvi-tools", "scvi-tools", "memory", "32"))
    common = ["--batch-key", batch_key, "--device", a.device, "--cuda-graph", a.cuda_graph,
              "--gene-likelihood", a.gene_likelihood]
    if h5ad is not None:
        common += ["--data", str(h5ad)]
    if store is not None:
        common += ["--store", str(store)]
    for k in ARCH_KEYS:
        common += [f"--{k.replace('_', '-')}", str(s[k])]
    common += ["--lr", str(s["lr"])]
    config = {k: s[k] for k in ARCH_KEYS} | {"lr": s["lr"], "suite": a.suite,
                                            "repeats": a.repeats,
                                            "gene_likelihood": a.gene_likelihood}
    what = f"train:{a.suite}"
    results: dict[tuple, list] = {}
    load_start = C.load_avg()
    ref_key = None

    def ratio_row(key, ref):
        fw, impl, src, prec = key
        runs = results[key]
        rate = C.summary([x for r in runs for x in r["rates"]])["median"]
        ref_rate = C.summary([x for r in ref for x in r["rates"]])["median"]
        return C.result_row(what, fw, "ratio_vs_scvi_tools", "x", rate / ref_rate,
                            impl=runs[0]["impl"], mode=f"{src}/{PRECISION_LABEL[prec]}",
                            shape=shape, config=config | {"reference": "scvi-tools fp32"},
                            notes=a.notes)

    for r in range(a.repeats):
        for fw, impl, src, precs in cases:
            args = common + ["--framework", fw, "--impl", impl, "--source", src,
                             "--precisions", precs, "--seed", str(r)]
            py = scvi_python if fw == "scvi-tools" else sys.executable
            print(f"[repeat {r}] {fw} {impl} {src} {precs} ...", flush=True)
            for res in C.stream_worker(py, __file__, args, a.timeout):
                key = (fw, impl, src, res["precision"])
                res["rates"] = [res["cells_per_epoch"] / t for t in res["epoch_times"][1:]]
                results.setdefault(key, []).append(res)
                print(f"    {PRECISION_LABEL[res['precision']]}: cells/s per timed epoch "
                      f"{['%.0f' % x for x in res['rates']]}, elbo_validation "
                      f"{res['elbo_validation']:.3f}, back-end {res['impl']}, "
                      f"{res['wall_s']:.1f} s", flush=True)
                if r < a.repeats - 1:
                    continue
                # the case's last repeat: record it now, so that a run cut short keeps it
                runs = results[key]
                mode = f"{src}/{PRECISION_LABEL[res['precision']]}"
                cfg = config | {"source": src}
                if fw == "scvi_fast":
                    cfg["cuda_graph"] = res["cuda_graph"]
                rows = [C.result_row(what, fw, "cells_per_s", "cells/s",
                                     [x for run in runs for x in run["rates"]],
                                     impl=res["impl"], mode=mode, shape=shape, config=cfg,
                                     notes=a.notes),
                        C.result_row(what, fw, "elbo_validation", "nats/cell",
                                     [run["elbo_validation"] for run in runs], impl=res["impl"],
                                     mode=mode, shape=shape, config=cfg, notes=a.notes)]
                if fw == "scvi-tools":
                    ref_key = key
                    rows += [ratio_row(k, runs) for k in results if k[0] == "scvi_fast"]
                elif ref_key is not None:
                    rows.append(ratio_row(key, results[ref_key]))
                C.record("train.csv", rows, device=a.device, python=py,
                         load_avg_start=load_start)

    ref = results.get(ref_key)
    ref_rate = C.summary([x for run in ref for x in run["rates"]])["median"] if ref else None
    print(f"\n{'framework':<11} {'impl':<11} {'mode':<17} {'cells/s':>9} {'p20':>8} {'p80':>8} "
          f"{'ratio':>6} {'elbo_val':>10}")
    for (fw, impl, src, prec), runs in results.items():
        st = C.summary([x for run in runs for x in run["rates"]])
        elbo = C.summary([run["elbo_validation"] for run in runs])["median"]
        ratio = st["median"] / ref_rate if ref_rate else float("nan")
        mode = f"{src}/{PRECISION_LABEL[prec]}"
        print(f"{fw:<11} {runs[0]['impl']:<11} {mode:<17} {st['median']:>9.0f} {st['p20']:>8.0f} "
              f"{st['p80']:>8.0f} {ratio:>6.2f} {elbo:>10.3f}")
        if ref and fw == "scvi_fast":
            ref_elbo = C.summary([run["elbo_validation"] for run in ref])["median"]
            print(f"{'':<11} validation ELBO {elbo:.3f} vs scvi-tools {ref_elbo:.3f} "
                  f"({abs(elbo - ref_elbo) / abs(ref_elbo):.2%} apart)")
    print(f"rows in {C.RESULTS / 'train.csv'}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1:])
    else:
        main()
