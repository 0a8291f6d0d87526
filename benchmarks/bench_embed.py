"""Embedding throughput (``get_latent_representation``): scvi_fast against scvi-tools.

The Census preset architecture (8000 genes, 512/50/2) on synthetic Census-shaped counts
(default 50k cells, 10% non-zeros, 128 batches), batch size 1024 for every framework. Each
framework runs in its own process; every pass over all cells is timed after one warm-up pass,
median over ``--repeats`` passes. scvi_fast reads from the in-memory AnnData and from a CSR
store (``--sources``); scvi-tools from the in-memory AnnData (``--scvi-python``; skipped when
unavailable). Rows go to ``benchmarks/results/embed.csv``.

Usage::

    python benchmarks/bench_embed.py --scvi-python /path/to/scvi/python [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common as C

FIELDS = [
    "date", "git_sha", "device", "load_avg", "framework", "impl", "source", "n_cells", "n_genes",
    "n_batches", "density", "n_hidden", "n_latent", "n_layers", "batch_size",
    "cells_per_s_median", "cells_per_s_p10", "cells_per_s_p90", "repeats", "ratio_vs_scvi_tools",
    "versions", "notes",
]
ARCH = {"n_hidden": 512, "n_latent": 50, "n_layers": 2}


def _worker_scvi_fast(a) -> dict:
    import anndata
    import torch

    import scvi_fast

    if a.source == "store":
        data = a.store
    else:
        data = anndata.read_h5ad(a.data)
        scvi_fast.SCVI.setup_anndata(data, batch_key="batch")
    model = scvi_fast.SCVI(data, impl=a.impl, **ARCH)
    model.device = torch.device(a.device)
    times = []
    for _ in range(a.repeats + 1):
        t0 = time.perf_counter()
        z = model.get_latent_representation(batch_size=a.batch_size)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"times": times[1:], "n": int(z.shape[0]),
            "impl": scvi_fast.functional.resolve_impl(a.impl, torch.device(a.device))}


def _worker_scvi_tools(a) -> dict:
    import anndata
    import scvi
    import torch

    ad = anndata.read_h5ad(a.data)
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    model = scvi.model.SCVI(ad, gene_likelihood="nb", **ARCH)  # same model as scvi_fast
    model.is_trained_ = True  # throughput does not depend on the weights; skip training
    model.module.to(torch.device(a.device))
    model.module.eval()
    times = []
    for _ in range(a.repeats + 1):
        t0 = time.perf_counter()
        z = model.get_latent_representation(batch_size=a.batch_size)
        times.append(time.perf_counter() - t0)
    return {"times": times[1:], "n": int(z.shape[0]), "impl": "scvi-tools"}


def worker(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--framework", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--store")
    p.add_argument("--source", default="memory")
    p.add_argument("--impl", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    res = _worker_scvi_fast(a) if a.framework == "scvi_fast" else _worker_scvi_tools(a)
    print(json.dumps(res))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-cells", type=int, default=50_000)
    p.add_argument("--n-genes", type=int, default=8000)
    p.add_argument("--n-batches", type=int, default=128)
    p.add_argument("--density", type=float, default=0.10)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", default="auto,torch")
    p.add_argument("--sources", default="memory,store")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scvi-python", default=None)
    p.add_argument("--workdir", default="/tmp/scvi_fast_bench")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--notes", default="")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    data = C.synthetic_h5ad(
        work / f"synthetic_{a.n_cells}x{a.n_genes}_{a.n_batches}b_{a.density}.h5ad",
        a.n_cells, a.n_genes, a.n_batches, a.density)
    sources = a.sources.split(",")
    store = work / (data.stem + ".store")
    if "store" in sources and not store.exists():
        from scvi_fast.data import CSRStore

        CSRStore.create(store, str(data), batch_key="batch")
    scvi_python = a.scvi_python or sys.executable
    have_scvi = C.has_module(scvi_python, "scvi")
    cases = [("scvi_fast", impl, src) for impl in a.impls.split(",") for src in sources]
    if have_scvi:
        cases.append(("scvi_tools", "scvi-tools", "memory"))
    else:
        print(f"scvi-tools not importable by {scvi_python}: its rows are skipped", flush=True)
    load_start = C.load_avg()
    results = {}
    for fw, impl, src in cases:
        args = ["--framework", fw, "--data", str(data), "--store", str(store), "--source", src,
                "--impl", impl, "--device", a.device, "--batch-size", str(a.batch_size),
                "--repeats", str(a.repeats)]
        print(f"{fw} {impl} {src} ...", flush=True)
        res = C.run_worker(scvi_python if fw == "scvi_tools" else sys.executable, __file__, args,
                           a.timeout)
        res["rates"] = [res["n"] / t for t in res["times"]]
        results[(fw, impl, src)] = res
        print(f"    cells/s {['%.0f' % r for r in res['rates']]} ({res['impl']})", flush=True)
    ref = results.get(("scvi_tools", "scvi-tools", "memory"))
    ref_rate = C.spread(ref["rates"])["median"] if ref else None
    base = {"date": C.now(), "git_sha": C.git_sha(), "device": C.device_name(a.device),
            "load_avg": f"{load_start} -> {C.load_avg()}", "n_cells": a.n_cells,
            "n_genes": a.n_genes, "n_batches": a.n_batches, "density": a.density,
            "batch_size": a.batch_size, "repeats": a.repeats, "notes": a.notes, **ARCH}
    rows = []
    print(f"\n{'framework':<11} {'impl':<11} {'source':<7} {'cells/s':>10} {'ratio':>7}")
    for (fw, impl, src), res in results.items():
        st = C.spread(res["rates"])
        ratio = st["median"] / ref_rate if ref_rate else float("nan")
        rows.append(dict(base, framework=fw, impl=res["impl"], source=src,
                         cells_per_s_median=round(st["median"], 1),
                         cells_per_s_p10=round(st["p10"], 1), cells_per_s_p90=round(st["p90"], 1),
                         ratio_vs_scvi_tools=round(ratio, 3) if ref_rate else "",
                         versions=C.versions(scvi_python if fw == "scvi_tools" else sys.executable)))
        print(f"{fw:<11} {res['impl']:<11} {src:<7} {st['median']:>10.0f} {ratio:>7.2f}")
    path = C.append_rows("embed.csv", rows, FIELDS)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1:])
    else:
        main()
