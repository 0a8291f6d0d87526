"""The published Census scVI model's shape at speed: load from scvi-tools format, embed 1M cells.

The CZ CELLxGENE Census model (2024-07-01) is an scvi-tools SCVI with 8000 genes,
n_hidden 128, n_latent 50, 2 layers, dropout 0.1 and about 7,400 batch categories.
This benchmark builds a model of exactly that shape from random weights, writes it
in scvi-tools' ``model.pt`` format, loads it back through scvi_fast's restricted
unpickler, embeds a synthetic CSR store of ``--n-cells`` cells (default 1M) and
reports cells/s and peak memory. It then embeds the first ``--st-cells`` cells
(default 20k) with scvi-tools itself (``scvi.model.SCVI.load`` of the same folder,
in a separate Python given by ``--scvi-python``) and with scvi_fast from the same
in-memory AnnData, checks that the two latent representations agree, and gives the
throughput ratios. Rows are appended to ``benchmarks/results/census_model.csv``.

Not run in CI::

    python benchmarks/bench_census_model.py                      # 1M cells, CPU
    python benchmarks/bench_census_model.py --n-cells 200000 --device cuda

The synthetic store is written once under ``--work`` (default /tmp) and reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    append_rows,
    device_name,
    git_sha,
    has_module,
    load_avg,
    now,
    run_worker,
    spread,
    versions,
)

CENSUS_SHAPE = {"n_genes": 8000, "n_hidden": 128, "n_latent": 50, "n_layers": 2, "dropout_rate": 0.1,
                "n_batch": 7400}
FIELDS = ["date", "git_sha", "device", "versions", "load_avg", "case", "impl", "n_cells", "nnz_per_cell",
          "batch_size", "seconds", "cells_per_s", "ratio_vs_scvi_tools", "peak_rss_gb", "peak_anon_gb",
          "load_model_s", "max_abs_diff_vs_scvi_tools", "notes"]


class PeakMemory:
    """Peak resident (``ru_maxrss``) and peak anonymous memory (sampled ``RssAnon``).

    Memory-mapped store pages count in RSS once touched although the kernel can drop
    them at any time; ``RssAnon`` is what the process itself allocated.
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_anon = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def anon_bytes() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, self.anon_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, self.anon_bytes())

    @staticmethod
    def peak_rss_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_store(work: Path, n_cells: int, density: float):
    from scvi_fast.data import CSRStore, write_synthetic_store

    path = work / f"census_shape_store_{n_cells}_{density}"
    if (path / "manifest.json").exists():
        store = CSRStore.open(path)
        if store.n_cells == n_cells and store.n_genes == CENSUS_SHAPE["n_genes"]:
            return store
    t0 = time.perf_counter()
    store = write_synthetic_store(path, n_cells, n_genes=CENSUS_SHAPE["n_genes"], n_batches=64,
                                  density=density, seed=0, overwrite=True)
    print(f"wrote {path}: {store.n_cells} cells, {store.nnz / store.n_cells:.0f} non-zeros per cell, "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return store


def make_census_shape_model(folder: Path, var_names) -> Path:
    """Random weights of the Census model's shape, saved in scvi-tools' format."""
    import torch

    import scvi_fast

    cats = [f"batch_{i}" for i in range(CENSUS_SHAPE["n_batch"])]
    registry = {"source": "anndata", "batch_key": "batch", "labels_key": "", "layer": "",
                "batch_categories": cats, "labels_categories": ["0"],
                "var_names": [str(v) for v in var_names]}
    torch.manual_seed(0)
    model = scvi_fast.SCVI(None, _registry=registry, **{k: CENSUS_SHAPE[k] for k in
                                                       ("n_hidden", "n_latent", "n_layers", "dropout_rate")})
    with torch.no_grad():
        for name, buf in model.module.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    model.is_trained_ = True
    model.save(folder, overwrite=True, format="scvi-tools")
    return folder


def scvi_fast_worker(model_dir: str, store_path: str, batch_size: str, out_npy: str, device: str,
                     impl: str) -> dict:
    """Load and embed the whole store in a fresh process, so that its peak memory is the embedding's."""
    import scvi_fast
    from scvi_fast.functional import resolve_impl

    t0 = time.perf_counter()
    model = scvi_fast.SCVI.load(model_dir, device=device, impl=impl)
    load_s = time.perf_counter() - t0
    bs = int(batch_size)
    model.get_latent_representation(store_path, indices=np.arange(8192), batch_size=bs)  # warm-up
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        z = model.get_latent_representation(store_path, batch_size=bs, out=out_npy)
        seconds = time.perf_counter() - t0
    return {"load_s": load_s, "seconds": seconds, "n": int(z.shape[0]),
            "impl": resolve_impl(model.module.impl, model.device),
            "peak_rss": mem.peak_rss_bytes(), "peak_anon": mem.peak_anon}


def scvi_tools_worker(model_dir: str, h5ad: str, batch_sizes: str, out_npy: str) -> dict:
    import anndata
    import torch

    import scvi

    scvi.settings.verbosity = 0
    adata = anndata.read_h5ad(h5ad)
    t0 = time.perf_counter()
    model = scvi.model.SCVI.load(model_dir, adata=adata, accelerator="cpu")
    load_s = time.perf_counter() - t0
    model.get_latent_representation(indices=np.arange(min(1024, adata.n_obs)))  # warm-up
    result = {"load_s": load_s, "n": adata.n_obs, "threads": torch.get_num_threads(), "runs": {}}
    for bs in [int(b) for b in batch_sizes.split(",")]:
        t0 = time.perf_counter()
        z = model.get_latent_representation(batch_size=bs)
        result["runs"][str(bs)] = time.perf_counter() - t0
    np.save(out_npy, z[:2000])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--st-cells", type=int, default=20_000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--impl", default="auto")
    p.add_argument("--work", default="/tmp/scvi_fast_census_bench")
    p.add_argument("--scvi-python", default="/work/venv-scvi/bin/python",
                   help="a Python with scvi-tools installed (skipped if it has none)")
    args = p.parse_args()
    if args.worker:
        mode, *rest = args.worker
        fn = {"scvi-tools": scvi_tools_worker, "scvi_fast": scvi_fast_worker}[mode]
        print(json.dumps(fn(*rest)))
        return 0

    import scvi_fast

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {load_avg()}", flush=True)
    store = make_store(work, args.n_cells, args.density)
    nnz_per_cell = store.nnz / store.n_cells
    model_dir = make_census_shape_model(work / "census_shape_model", store.var_names)
    size_mb = (model_dir / "model.pt").stat().st_size / 1e6
    print(f"model.pt of the Census shape: {size_mb:.1f} MB", flush=True)

    res = run_worker(sys.executable, str(Path(__file__).resolve()),
                     ["scvi_fast", str(model_dir), str(store.path), str(args.batch_size),
                      str(work / "latent_full.npy"), args.device, args.impl], timeout=3600)
    impl, full_s, load_s = res["impl"], res["seconds"], res["load_s"]
    full_rate = res["n"] / full_s
    print(f"scvi_fast ({impl}): loaded in {load_s:.2f} s; embedded {res['n']} cells ({nnz_per_cell:.0f} "
          f"nnz/cell) in {full_s:.1f} s = {full_rate:,.0f} cells/s; peak RSS {res['peak_rss'] / 1e9:.2f} GB "
          f"(memory-mapped store pages included), peak anonymous {res['peak_anon'] / 1e9:.2f} GB", flush=True)
    base = {"date": now(), "git_sha": git_sha(), "device": device_name(args.device),
            "versions": versions(), "impl": impl, "load_model_s": round(load_s, 3)}
    rows = [{**base, "case": "scvi_fast store", "n_cells": res["n"], "nnz_per_cell": round(nnz_per_cell, 1),
             "batch_size": args.batch_size, "seconds": round(full_s, 3), "cells_per_s": round(full_rate),
             "peak_rss_gb": round(res["peak_rss"] / 1e9, 3), "peak_anon_gb": round(res["peak_anon"] / 1e9, 3),
             "load_avg": load_avg()}]

    # the same cells through scvi-tools and through scvi_fast from one in-memory AnnData
    n_sub = min(args.st_cells, store.n_cells)
    sub = store.to_anndata(rows=np.arange(n_sub))
    sub_path = work / f"subset_{n_sub}.h5ad"
    sub.write_h5ad(sub_path)
    fast = scvi_fast.SCVI.load(model_dir, adata=sub, device=args.device, impl=args.impl)
    fast.get_latent_representation(indices=np.arange(1024))
    cases = {
        "scvi_fast anndata": lambda: fast.get_latent_representation(batch_size=args.batch_size),
        "scvi_fast store subset": lambda: fast.get_latent_representation(
            store.path, indices=np.arange(n_sub), batch_size=args.batch_size),
    }
    rates = {}
    for case, fn in cases.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            z = fn()
            times.append(time.perf_counter() - t0)
        if case == "scvi_fast anndata":
            z_fast = z
        sec = spread(times)["median"]
        rates[case] = n_sub / sec
        print(f"{case}, first {n_sub} cells: median of 3 {sec:.2f} s = {rates[case]:,.0f} cells/s", flush=True)
        rows.append({**base, "case": case, "n_cells": n_sub, "nnz_per_cell": round(nnz_per_cell, 1),
                     "batch_size": args.batch_size, "seconds": round(sec, 3), "cells_per_s": round(rates[case]),
                     "load_avg": load_avg(), "notes": "median of 3"})
    sub_rate = rates["scvi_fast anndata"]
    if has_module(args.scvi_python, "scvi"):
        st_sizes = sorted({128, args.batch_size})
        res = run_worker(args.scvi_python, str(Path(__file__).resolve()),
                         ["scvi-tools", str(model_dir), str(sub_path), ",".join(map(str, st_sizes)),
                          str(work / "latent_scvi_tools.npy")], timeout=1800)
        z_st = np.load(work / "latent_scvi_tools.npy")
        diff = float(np.abs(z_st - z_fast[: len(z_st)]).max())
        st_versions = versions(args.scvi_python)
        for bs, sec in res["runs"].items():
            rate = n_sub / sec
            notes = "scvi-tools default batch size" if int(bs) == 128 else ""
            print(f"scvi-tools (batch {bs}): {sec:.2f} s = {rate:,.0f} cells/s; scvi_fast store "
                  f"{full_rate / rate:.1f}x, scvi_fast AnnData {sub_rate / rate:.1f}x; "
                  f"latent max|diff| {diff:.2e}; load {res['load_s']:.2f} s", flush=True)
            rows.append({**base, "versions": st_versions, "impl": "scvi-tools", "case": "scvi-tools anndata",
                         "n_cells": n_sub, "nnz_per_cell": round(nnz_per_cell, 1), "batch_size": int(bs),
                         "seconds": round(sec, 3), "cells_per_s": round(rate), "load_avg": load_avg(),
                         "load_model_s": round(res["load_s"], 3), "max_abs_diff_vs_scvi_tools": f"{diff:.3g}",
                         "notes": notes})
        ref_rate = n_sub / res["runs"][str(args.batch_size)]
        rows[0]["ratio_vs_scvi_tools"] = round(full_rate / ref_rate, 2)
        for r in rows[1:3]:
            r["ratio_vs_scvi_tools"] = round(r["cells_per_s"] / ref_rate, 2)
        rows[1]["max_abs_diff_vs_scvi_tools"] = f"{diff:.3g}"
    else:
        print(f"{args.scvi_python} has no scvi-tools: comparison skipped")
    path = append_rows("census_model.csv", rows, FIELDS)
    print(f"appended {len(rows)} rows to {path.relative_to(ROOT)}; load average after: {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
