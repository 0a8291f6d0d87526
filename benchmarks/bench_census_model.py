"""The published Census scVI model's shape at speed: load from scvi-tools format, embed a store.

The CZ CELLxGENE Census model (2024-07-01) is an scvi-tools SCVI with 8000 genes,
n_hidden 128, n_latent 50, 2 layers, dropout 0.1 and about 7,400 batch categories.
This benchmark builds a model of exactly that shape from random weights, writes it
in scvi-tools' ``model.pt`` format (``--model-format scvi_fast``: scvi_fast's own format
for scvi_fast, the scvi-tools copy for scvi-tools only), loads it back through scvi_fast's
restricted unpickler, and embeds a synthetic CSR store of ``--n-cells`` cells (default 1M;
``--store`` embeds an existing store instead) streaming the latent space to a ``.npy``
(``out=``), once per batch size of ``--batch-sizes``, each in a fresh process: cells/s
(median over ``--repeats`` passes after a warm-up), peak resident memory (``VmHWM``, which
counts the memory-mapped store pages it touched) and peak anonymous memory (what the process
allocated). It then embeds the first ``--st-cells`` cells (default 20k; 0 skips this part)
with scvi-tools itself (``scvi.model.SCVI.load`` of the same folder, in a separate Python
given by ``--scvi-python``) and with scvi_fast from the same in-memory AnnData, checks that the
two latent representations agree, and gives the throughput ratios. Rows (long schema, ``what``
= ``embed:census_model``) are appended to ``census_model.csv`` as each case completes.

Not run in CI::

    python benchmarks/bench_census_model.py                      # 1M cells, CPU
    python benchmarks/bench_census_model.py --n-cells 200000 --device cuda --batch-sizes 16384,1024

The synthetic store is written once under ``--work`` (default /tmp) and reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CENSUS_SHAPE = {"n_genes": 8000, "n_hidden": 128, "n_latent": 50, "n_layers": 2, "dropout_rate": 0.1,
                "n_batch": 7400}
WHAT = "embed:census_model"


class PeakMemory:
    """Peak anonymous memory (sampled ``RssAnon``): what the process itself allocated.

    Memory-mapped store pages count in the resident set (:func:`_common.peak_rss_mb`) once
    touched although the kernel can drop them at any time; they are not anonymous.
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


def make_census_shape_model(folder: Path, var_names, fmt: str = "scvi-tools") -> Path:
    """Random weights of the Census model's shape, saved in scvi-tools' format at ``folder``
    (and in scvi_fast's at ``folder_native`` when ``fmt`` is ``"scvi_fast"``); returns the
    folder scvi_fast should load."""
    import torch

    import scvi_fast

    from scvi_fast.model import Registry

    cats = tuple(f"batch_{i}" for i in range(CENSUS_SHAPE["n_batch"]))
    registry = Registry(var_names=tuple(str(v) for v in var_names), batch_key="batch",
                        batch_categories=cats)
    model = scvi_fast.SCVI(registry, gene_likelihood="nb",  # the Census model is NB
                           **{k: CENSUS_SHAPE[k] for k in
                              ("n_hidden", "n_latent", "n_layers", "dropout_rate")})
    with torch.no_grad():
        for name, buf in model.module.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    model.is_trained_ = True
    model.save(folder, overwrite=True, format="scvi-tools")
    if fmt == "scvi-tools":
        return folder
    native = folder.with_name(folder.name + "_native")
    model.save(native, overwrite=True)
    return native


def scvi_fast_worker(model_dir: str, store_path: str, batch_size: str, out_npy: str, device: str,
                     impl: str, repeats: str) -> dict:
    """Load and embed the whole store in a fresh process, so that its peak memory is the
    embedding's: a warm-up on the first cells, then ``repeats`` passes streamed to ``out_npy``."""
    import torch

    import scvi_fast
    from scvi_fast.functional import resolve_impl

    t0 = time.perf_counter()
    model = scvi_fast.SCVI.load(model_dir, device=device, impl=impl)
    load_s = time.perf_counter() - t0
    bs = int(batch_size)
    from scvi_fast.data import CSRStore

    n_warm = min(4 * bs, 65536, CSRStore.open(store_path).n_cells)
    model.get_latent_representation(store_path, indices=np.arange(n_warm), batch_size=bs)
    cuda = str(model.device).startswith("cuda")
    times = []
    with PeakMemory() as mem:
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            z = model.get_latent_representation(store_path, batch_size=bs, out=out_npy)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            n = int(z.shape[0])
            del z
    return {"load_s": load_s, "seconds": times, "n": n,
            "impl": resolve_impl(model.module.impl, model.device),
            "peak_rss_mb": C.peak_rss_mb(), "peak_anon_mb": mem.peak_anon / 2**20,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def scvi_tools_worker(model_dir: str, h5ad: str, batch_sizes: str, out_npy: str,
                      device: str = "cpu") -> dict:
    import anndata
    import torch

    import scvi

    scvi.settings.verbosity = 0
    adata = anndata.read_h5ad(h5ad)
    t0 = time.perf_counter()
    model = scvi.model.SCVI.load(model_dir, adata=adata,
                                 accelerator="gpu" if device.startswith("cuda") else "cpu")
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
    p.add_argument("--n-batches", type=int, default=64, help="batches of the synthetic store")
    p.add_argument("--store", help="embed this CSR store (8000 genes) instead of a synthetic one")
    p.add_argument("--st-cells", type=int, default=20_000,
                   help="cells of the scvi-tools / in-memory comparison (0: skip it)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--batch-sizes", default="1024",
                   help="comma-separated batch sizes of the store embedding (the last one is "
                        "also the comparison's)")
    p.add_argument("--repeats", type=int, default=1, help="passes over the store per batch size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--impl", default="auto")
    p.add_argument("--model-format", default="scvi-tools", choices=["scvi-tools", "scvi_fast"],
                   help="the format scvi_fast loads the model from")
    p.add_argument("--work", default="/tmp/scvi_fast_census_bench")
    p.add_argument("--scvi-python", default=sys.executable,
                   help="a Python with scvi-tools installed (skipped if it has none)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--notes", default="")
    args = p.parse_args()
    if args.worker:
        mode, *rest = args.worker
        fn = {"scvi-tools": scvi_tools_worker, "scvi_fast": scvi_fast_worker}[mode]
        print(json.dumps(fn(*rest)))
        return 0

    import scvi_fast
    from scvi_fast.data import CSRStore

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = C.load_avg()
    print(f"load average before: {load_start}", flush=True)
    if args.store:
        store = CSRStore.open(args.store)
    else:
        key = (args.n_cells, CENSUS_SHAPE["n_genes"], args.n_batches, args.density)
        store = CSRStore.open(C.synthetic_store(C.synthetic_path(work, *key, ".store"), *key))
    nnz_per_cell = store.nnz / store.n_cells
    model_dir = make_census_shape_model(work / "census_shape_model", store.var_names,
                                        args.model_format)
    st_dir = work / "census_shape_model"  # scvi-tools' format, for scvi-tools
    size_mb = (st_dir / "model.pt").stat().st_size / 1e6
    print(f"model.pt of the Census shape: {size_mb:.1f} MB; scvi_fast loads {model_dir.name}",
          flush=True)
    shape = {"cells": store.n_cells, "genes": store.n_genes, "nnz_per_cell": round(nnz_per_cell, 1)}
    arch = {k: CENSUS_SHAPE[k] for k in ("n_hidden", "n_latent", "n_layers", "n_batch")}
    script = str(Path(__file__).resolve())
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    def rec(rows, python=sys.executable):
        C.record("census_model.csv", rows, device=args.device, python=python,
                 load_avg_start=load_start)

    full_rate = None
    for bs in batch_sizes:
        res = C.run_worker(sys.executable, script,
                           ["scvi_fast", str(model_dir), str(store.path), str(bs),
                            str(work / "latent_full.npy"), args.device, args.impl,
                            str(args.repeats)], timeout=args.timeout)
        rates = [res["n"] / t for t in res["seconds"]]
        full_rate = C.summary(rates)["median"]
        kw = dict(impl=res["impl"], mode="store/out", shape=shape, notes=args.notes,
                  config=arch | {"batch_size": bs, "model_format": args.model_format,
                                 "repeats": args.repeats})
        rows = [C.result_row(WHAT, "scvi_fast", "cells_per_s", "cells/s", rates, **kw),
                C.result_row(WHAT, "scvi_fast", "peak_rss_mb", "MB", res["peak_rss_mb"], **kw),
                C.result_row(WHAT, "scvi_fast", "peak_anon_mb", "MB", res["peak_anon_mb"], **kw),
                C.result_row(WHAT, "scvi_fast", "load_model_s", "s", res["load_s"], **kw)]
        if res["peak_cuda_mb"] is not None:
            rows.append(C.result_row(WHAT, "scvi_fast", "peak_cuda_mb", "MB",
                                     res["peak_cuda_mb"], **kw))
        rec(rows)
        print(f"scvi_fast ({res['impl']}), batch {bs}: loaded in {res['load_s']:.2f} s; embedded "
              f"{res['n']} cells ({nnz_per_cell:.0f} nnz/cell) to .npy at {full_rate:,.0f} cells/s "
              f"(median of {len(rates)}); peak RSS {res['peak_rss_mb']:.0f} MB (memory-mapped "
              f"store pages included), peak anonymous {res['peak_anon_mb']:.0f} MB", flush=True)
    if args.st_cells <= 0:
        print(f"rows in {C.RESULTS / 'census_model.csv'}; load average after: {C.load_avg()}")
        return 0

    # the same cells through scvi-tools and through scvi_fast from one in-memory AnnData
    from scvi_fast.data import write_h5ad

    bs = batch_sizes[-1]
    n_sub = min(args.st_cells, store.n_cells)
    sub = store.to_anndata(rows=np.arange(n_sub))
    sub_path = work / f"subset_{n_sub}.h5ad"
    write_h5ad(sub, sub_path)
    fast = scvi_fast.SCVI.load(model_dir, adata=sub, device=args.device, impl=args.impl)
    fast.get_latent_representation(indices=np.arange(min(1024, n_sub)))
    sub_shape = dict(shape, cells=n_sub)
    cases = {
        "memory": lambda: fast.get_latent_representation(batch_size=bs),
        "store_subset": lambda: fast.get_latent_representation(
            store.path, indices=np.arange(n_sub), batch_size=bs),
    }
    rates, z_fast = {}, None
    for case, fn in cases.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            z = fn()
            times.append(time.perf_counter() - t0)
        if case == "memory":
            z_fast = z
        rates[case] = [n_sub / t for t in times]
        kw = dict(impl=scvi_fast.functional.resolve_impl(fast.module.impl, fast.device),
                  mode=case, shape=sub_shape, notes=args.notes,
                  config=arch | {"batch_size": bs, "model_format": args.model_format})
        rec([C.result_row(WHAT, "scvi_fast", "cells_per_s", "cells/s", rates[case], **kw)])
        print(f"scvi_fast {case}, first {n_sub} cells: median of 3 "
              f"{C.summary(rates[case])['median']:,.0f} cells/s", flush=True)
    if not C.has_module(args.scvi_python, "scvi"):
        print(f"{args.scvi_python} has no scvi-tools: comparison skipped")
        return 0
    st_sizes = sorted({128, bs})
    res = C.run_worker(args.scvi_python, script,
                       ["scvi-tools", str(st_dir), str(sub_path), ",".join(map(str, st_sizes)),
                        str(work / "latent_scvi_tools.npy"), args.device], timeout=args.timeout)
    z_st = np.load(work / "latent_scvi_tools.npy")
    diff = float(np.abs(z_st - np.asarray(z_fast)[: len(z_st)]).max())
    rows = []
    for b, sec in res["runs"].items():
        rate = n_sub / sec
        kw = dict(impl="scvi-tools", mode="memory", shape=sub_shape,
                  config=arch | {"batch_size": int(b)},
                  notes="scvi-tools default batch size" if int(b) == 128 else args.notes)
        rows += [C.result_row(WHAT, "scvi-tools", "cells_per_s", "cells/s", rate, **kw),
                 C.result_row(WHAT, "scvi-tools", "load_model_s", "s", res["load_s"], **kw)]
        print(f"scvi-tools (batch {b}): {sec:.2f} s = {rate:,.0f} cells/s; latent max|diff| "
              f"{diff:.2e}; load {res['load_s']:.2f} s", flush=True)
    rec(rows, python=args.scvi_python)
    ref_rate = n_sub / res["runs"][str(bs)]
    kw = dict(config=arch | {"batch_size": bs, "reference": f"scvi-tools batch {bs}"},
              notes=args.notes)
    rows = [C.result_row(WHAT, "scvi_fast", "ratio_vs_scvi_tools", "x", full_rate / ref_rate,
                         mode="store/out", shape=shape, **kw),
            C.result_row(WHAT, "scvi_fast", "max_abs_diff_vs_scvi_tools", "", diff,
                         mode="memory", shape=sub_shape, **kw)]
    for case, r in rates.items():
        rows.append(C.result_row(WHAT, "scvi_fast", "ratio_vs_scvi_tools", "x",
                                 C.summary(r)["median"] / ref_rate, mode=case, shape=sub_shape,
                                 **kw))
    rec(rows)
    print(f"ratios vs scvi-tools (batch {bs}): store streamed {full_rate / ref_rate:.2f}x, "
          + ", ".join(f"{c} {C.summary(r)['median'] / ref_rate:.2f}x" for c, r in rates.items()))
    print(f"rows in {C.RESULTS / 'census_model.csv'}; load average after: {C.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
