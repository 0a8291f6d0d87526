"""Embedding throughput (``get_latent_representation``): scvi_fast against scvi-tools.

The Census preset architecture (8000 genes, 512/50/2) on synthetic Census-shaped counts
(default 50k cells, 10% non-zeros, 128 batches). Each framework runs in its own process.

scvi_fast reads from the in-memory AnnData and from a CSR store (``--sources``), at every batch
size of ``--batch-sizes`` (default 1024 on the CPU; 1024 and 16384 on CUDA), every precision of
``--precisions`` (default fp32; fp32 and bf16 autocast on CUDA) and every output of ``--outputs``:
``array`` (returned in memory) and ``npy`` (streamed to a ``.npy`` file with ``out=``).
scvi-tools (``--scvi-python``, in-memory AnnData, ``gene_likelihood="nb"``, the same
architecture, fp32) runs at the same batch sizes; it is skipped when unavailable.

In every process each configuration runs one untimed warm-up pass, then ``--repeats`` timed
passes. The first call of a process (after the model is built) is timed apart: the cost a
single call pays for first-time set-up. With ``--rounds N`` every case runs N times, the cases
interleaved round by round (a fresh process each time), so that a shared machine's load falls
on all of them alike; medians are over all rounds, and each ratio to scvi-tools is the median
of the per-round ratios. Peak resident memory is sampled during each configuration's passes
(``peak_rss``, and ``rss_growth`` above the resident set before them); on CUDA the peak device
memory too. ``max_abs_diff`` compares the first minibatches' embedding with a plain per-batch
loop in fp32 (0 for fp32: the pipeline changes nothing; the bf16 rounding error otherwise).

Rows (the long schema of ``_common.result_row``) are appended to
``benchmarks/results/embed.csv`` as each case finishes, all dated with the run's start;
``mode`` is ``<source>/<output>/<precision>`` (e.g. ``store/npy/bf16-mixed``) and the batch
size is in ``shape`` and ``config``. The data are the synthetic store of ``_common`` (the
``.h5ad`` is made from it only for the in-memory and scvi-tools cases).

Usage::

    python benchmarks/bench_embed.py --scvi-python /path/to/scvi/python [--device cuda]
    # small calls, side by side, five interleaved rounds:
    python benchmarks/bench_embed.py --n-cells 20000 --rounds 5 --repeats 1 --impls auto \\
        --sources memory --outputs array --scvi-python /path/to/scvi/python
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

import _common as C

ARCH = {"n_hidden": 512, "n_latent": 50, "n_layers": 2}
PRECISION_LABEL = {"32": "fp32", "bf16-mixed": "bf16-mixed"}
#: minibatches compared with the plain per-batch loop in each configuration
CHECK_BATCHES = 2


class PeakRSS:
    """Peak resident memory of this process while the block runs (VmRSS sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.base = self.peak = float("nan")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, C.rss_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = C.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, C.rss_mb())


def _timed_passes(call, repeats: int):
    """``repeats`` timed calls of ``call() -> (seconds, z)`` under :class:`PeakRSS`."""
    times = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t, z = call()
            times.append(t)
    return z, {"times": times, "n": int(z.shape[0]), "peak_rss_mb": mem.peak,
               "rss_growth_mb": mem.peak - mem.base}


def _configs(a) -> list[dict]:
    return [{"batch_size": int(bs), "precision": p, "output": o}
            for bs in a.batch_sizes.split(",") for p in a.precisions.split(",")
            for o in a.outputs.split(",")]


def _worker_scvi_fast(a) -> dict:
    import anndata
    import torch

    import scvi_fast
    from scvi_fast.analysis import latent_fn

    if a.source == "store":
        data = a.store
    else:
        data = anndata.read_h5ad(a.data)
        scvi_fast.SCVI.setup_anndata(data, batch_key="batch")
    model = scvi_fast.SCVI(data, impl=a.impl, gene_likelihood="nb", **ARCH)
    model.device = torch.device(a.device)
    cuda = model.device.type == "cuda"
    out_path = Path(a.workdir) / f"latent_{os.getpid()}.npy"

    def call(cfg):
        out = out_path if cfg["output"] == "npy" else None
        t0 = time.perf_counter()
        z = model.get_latent_representation(batch_size=cfg["batch_size"], out=out,
                                            precision=cfg["precision"])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, z

    results = []
    for i, cfg in enumerate(_configs(a)):
        res = dict(cfg)
        first_s, z = call(cfg)  # the warm-up pass; in a fresh process also the first call
        if i == 0:
            res["first_call_s"] = first_s
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        z, timed = _timed_passes(lambda: call(cfg), a.repeats)
        res.update(timed)
        if cuda:
            res["peak_gpu_mb"] = torch.cuda.max_memory_allocated(model.device) / 2**20
        # the first minibatches through a plain loop (fp32, one batch at a time)
        fn = latent_fn(model.module)
        ref = []
        with torch.inference_mode():
            loader = model._loader(model._source(), batch_size=cfg["batch_size"])
            for k, mb in enumerate(loader):
                if k == CHECK_BATCHES:
                    break
                ref.append(fn(mb.to(model.device)).float().cpu().numpy())
        ref = np.concatenate(ref)
        res["max_abs_diff"] = float(np.abs(np.asarray(z[: len(ref)]) - ref).max())
        del z
        out_path.unlink(missing_ok=True)
        results.append(res)
    impl = scvi_fast.functional.resolve_impl(a.impl, model.device)
    return {"impl": impl, "configs": results}


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
    cuda = a.device.startswith("cuda")

    def call(bs):
        t0 = time.perf_counter()
        z = model.get_latent_representation(batch_size=bs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, z

    results = []
    for i, bs in enumerate(int(b) for b in a.batch_sizes.split(",")):
        res = {"batch_size": bs, "precision": "32", "output": "array"}
        first_s, z = call(bs)
        if i == 0:
            res["first_call_s"] = first_s
        res.update(_timed_passes(lambda: call(bs), a.repeats)[1])
        results.append(res)
    return {"impl": "scvi-tools", "configs": results}


def worker(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--framework", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--store")
    p.add_argument("--source", default="memory")
    p.add_argument("--impl", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", default="1024")
    p.add_argument("--precisions", default="32")
    p.add_argument("--outputs", default="array")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp")
    a = p.parse_args(argv)
    res = _worker_scvi_fast(a) if a.framework == "scvi_fast" else _worker_scvi_tools(a)
    print(json.dumps(res))


def _key(cfg: dict) -> tuple:
    return cfg["batch_size"], cfg["precision"], cfg["output"]


def _mode(source: str, cfg: dict) -> str:
    """``<source>/<output>/<precision>``, e.g. ``store/npy/bf16-mixed``."""
    return f"{source}/{cfg['output']}/{PRECISION_LABEL[cfg['precision']]}"


def _case_rows(provider: str, impl: str, source: str, rounds: list[dict], shape: dict,
               base_config: dict, ref_rounds: list[dict] | None, notes: str) -> list[dict]:
    """Rows of one case from its rounds (each: ``{config key: worker result}``)."""
    rows = []
    for key, cfg in rounds[0].items():
        per_round = [r[key] for r in rounds if key in r]
        rates = [c["n"] / t for c in per_round for t in c["times"]]
        config = dict(base_config, batch_size=cfg["batch_size"], precision=cfg["precision"],
                      output=cfg["output"], rounds=len(per_round))
        common = dict(impl=impl, mode=_mode(source, cfg), shape=dict(shape, B=cfg["batch_size"]),
                      config=config, notes=notes)
        rows.append(C.result_row("embed", provider, "cells_per_s", "cells/s", rates, **common))
        first = [c["n"] / c["first_call_s"] for c in per_round if "first_call_s" in c]
        if first:
            rows.append(C.result_row("embed", provider, "first_call_cells_per_s", "cells/s",
                                     first, **common))
        rows.append(C.result_row("embed", provider, "peak_rss", "MB",
                                 [c["peak_rss_mb"] for c in per_round], **common))
        rows.append(C.result_row("embed", provider, "rss_growth", "MB",
                                 [c["rss_growth_mb"] for c in per_round], **common))
        if "peak_gpu_mb" in cfg:
            rows.append(C.result_row("embed", provider, "peak_gpu_memory", "MB",
                                     [c["peak_gpu_mb"] for c in per_round], **common))
        if "max_abs_diff" in cfg:
            rows.append(C.result_row("embed", provider, "max_abs_diff", "",
                                     [c["max_abs_diff"] for c in per_round], **common))
        # against scvi-tools at the same batch size, round by round
        ref_key = (cfg["batch_size"], "32", "array")
        if ref_rounds and ref_key in ref_rounds[0]:
            ratios = []
            for mine, ref in zip(rounds, ref_rounds):
                if key in mine and ref_key in ref:
                    a = np.median([mine[key]["n"] / t for t in mine[key]["times"]])
                    b = np.median([ref[ref_key]["n"] / t for t in ref[ref_key]["times"]])
                    ratios.append(a / b)
            rows.append(C.result_row("embed", provider, "ratio_vs_scvi_tools", "x", ratios,
                                     **common))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-cells", type=int, default=50_000)
    p.add_argument("--n-genes", type=int, default=8000)
    p.add_argument("--n-batches", type=int, default=128)
    p.add_argument("--density", type=float, default=0.10)
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated; default 1024 on the CPU, 1024,16384 on CUDA")
    p.add_argument("--precisions", default=None,
                   help="comma-separated of 32, bf16-mixed; default 32 on the CPU, both on CUDA")
    p.add_argument("--outputs", default="array,npy", help="array (in memory), npy (out=)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--impls", default="auto,torch")
    p.add_argument("--sources", default="memory,store")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scvi-python", default=None)
    p.add_argument("--workdir", default="/tmp/scvi_fast_bench")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--notes", default="")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.batch_sizes = a.batch_sizes or ("1024,16384" if cuda else "1024")
    a.precisions = a.precisions or ("32,bf16-mixed" if cuda else "32")
    work = Path(a.workdir)
    sources = a.sources.split(",")
    shape_args = (a.n_cells, a.n_genes, a.n_batches, a.density)
    store = C.synthetic_store(C.synthetic_path(work, *shape_args, ".store"), *shape_args)
    scvi_python = a.scvi_python or sys.executable
    have_scvi = C.has_module(scvi_python, "scvi")
    data = C.synthetic_path(work, *shape_args, ".h5ad")
    if have_scvi or "memory" in sources:  # the store is all the other cases read
        data = C.synthetic_h5ad(data, *shape_args)
    cases = []
    if have_scvi:
        cases.append(("scvi-tools", "scvi-tools", "memory"))  # first: the ratios need it
    else:
        print(f"scvi-tools not importable by {scvi_python}: its rows are skipped", flush=True)
    cases += [("scvi_fast", impl, src) for impl in a.impls.split(",") for src in sources]
    shape = {"n_cells": a.n_cells, "G": a.n_genes, "H": ARCH["n_hidden"], "Z": ARCH["n_latent"],
             "layers": ARCH["n_layers"]}
    base_config = {"n_batches": a.n_batches, "density": a.density, "repeats": a.repeats,
                   "device": a.device}
    load_start = C.load_avg()
    run_date = C.now()  # every row of the run carries its start, so that a run reads as one
    rounds: dict[tuple, list[dict]] = {c: [] for c in cases}
    impls: dict[tuple, str] = {}
    for r in range(a.rounds):
        for case in cases:
            fw, impl, src = case
            scvi = fw == "scvi-tools"
            args = ["--framework", fw, "--data", str(data), "--store", str(store), "--source", src,
                    "--impl", impl, "--device", a.device, "--batch-sizes", a.batch_sizes,
                    "--precisions", "32" if scvi else a.precisions,
                    "--outputs", "array" if scvi else a.outputs,
                    "--repeats", str(a.repeats), "--workdir", str(work)]
            print(f"[round {r + 1}/{a.rounds}] {fw} {impl} {src} ...", flush=True)
            res = C.run_worker(scvi_python if scvi else sys.executable, __file__, args, a.timeout)
            impls[case] = res["impl"]
            rounds[case].append({_key(c): c for c in res["configs"]})
            for c in res["configs"]:
                rates = [c["n"] / t for t in c["times"]]
                print(f"    B={c['batch_size']:<6} {c['precision']:<10} {c['output']:<5} cells/s "
                      f"{['%.0f' % x for x in rates]}  peak RSS {c['peak_rss_mb']:.0f} MB", flush=True)
            if r + 1 < a.rounds:
                continue
            ref = rounds.get(("scvi-tools", "scvi-tools", "memory"))
            rows = [dict(row, date=run_date) for row in _case_rows(
                fw, res["impl"], src, rounds[case], shape, base_config, None if scvi else ref,
                a.notes)]
            path = C.record("embed.csv", rows, device=a.device,
                            python=scvi_python if scvi else sys.executable,
                            load_avg_start=load_start)
            print(f"    appended {len(rows)} rows to {path}", flush=True)
    print(f"\n{'provider':<11} {'impl':<11} {'mode':<24} {'B':>6} {'cells/s':>10} {'ratio':>7}")
    ref = rounds.get(("scvi-tools", "scvi-tools", "memory"))
    for case, rs in rounds.items():
        for key in rs[0]:
            rate = np.median([rd[key]["n"] / t for rd in rs for t in rd[key]["times"]])
            ref_key = (key[0], "32", "array")
            ratio = ""
            if ref and case[0] != "scvi-tools" and ref_key in ref[0]:
                rr = np.median([rd[ref_key]["n"] / t for rd in ref for t in rd[ref_key]["times"]])
                ratio = f"{rate / rr:.2f}"
            mode = _mode(case[2], rs[0][key])
            print(f"{case[0]:<11} {impls[case]:<11} {mode:<24} {key[0]:>6} {rate:>10.0f} {ratio:>7}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1:])
    else:
        main()
