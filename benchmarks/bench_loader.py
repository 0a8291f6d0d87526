"""Minibatch loading throughput and peak memory: scvi_fast's CSR loader against baselines.

Cases, each run in its own process so that peak RSS is its own:

* ``store``: ``CSRLoader`` on an on-disk CSR store whose pages are in the page cache (warm);
* ``store_mmap``: the same, gathering straight from the memory map (``stage=False``);
* ``memory``: ``CSRLoader`` on an in-memory AnnData (CSR ``X``);
* ``scvi_tools``: scvi-tools' ``AnnDataLoader`` on the same in-memory AnnData (needs a Python
  with scvi-tools, ``--scvi-python``; skipped otherwise);
* ``toarray``: a plain loop of ``adata.X[idx].toarray()`` over shuffled batches.

Every case reads each minibatch's values once (a sum), as a training step would. Throughput is
cells/s over whole passes (median, min and max over ``--repeats``), and cells per CPU-second of
the process (all its threads), which is less sensitive to other load; peak RSS is the process's
maximum resident set, and ``base_rss_mb`` the resident set after imports, before any data.
Rows are appended to ``benchmarks/results/loader.csv`` with the CPU, versions, git sha and
load average (the machine may be shared: compare rows taken in the same run).

Usage::

    python benchmarks/bench_loader.py --sizes 200000 2000000 --workdir /tmp/scvi_fast_bench \\
        --scvi-python /path/to/venv-with-scvi-tools/bin/python
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "loader.csv"
FIELDS = [
    "date", "git_sha", "device", "load_avg_start", "load_avg_end", "case", "n_cells", "n_genes",
    "density", "batch_size", "cells_per_s_median", "cells_per_s_min", "cells_per_s_max",
    "repeats", "cells_per_cpu_s", "peak_rss_mb", "base_rss_mb", "versions", "notes",
]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the process that
    # called exec, so a worker would report the driver's peak
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _time_passes(run_pass, repeats: int, budget_s: float):
    """Cells/s of ``repeats`` passes (a pass stops once ``budget_s`` has elapsed) and cells
    per CPU-second over all of them."""
    rates = []
    cells, cpu = 0, 0.0
    for r in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        n = run_pass(r, t0 + budget_s)
        rates.append(n / (time.perf_counter() - t0))
        cpu += time.process_time() - c0
        cells += n
    return rates, cells / cpu


# --------------------------------------------------------------------------- worker cases
def _case_scvi_fast(args, base):
    import numpy as np

    from scvi_fast.data import CSRLoader, CSRStore

    store = CSRStore.open(args.store)
    stage = False if args.case == "store_mmap" else None
    if args.case == "memory":
        source = store.to_anndata()
        del store
    else:
        source = store
    loader = CSRLoader(source, batch_size=args.batch_size, shuffle=True, seed=0,
                       block_size=args.block_size, buffer_size=args.buffer_size, stage=stage)
    # warm-up: compile (cached) kernels, fill the buffer pools, touch the page cache
    for i, mb in enumerate(loader):
        if i == 20:
            break

    def run_pass(r, deadline):
        loader.set_epoch(r + 1)
        n = 0
        acc = 0.0
        for mb in loader:
            acc += float(np.add.reduce(mb.values))
            n += mb.n_cells
            if time.perf_counter() > deadline:
                break
        return n

    return _time_passes(run_pass, args.repeats, args.budget)


def _case_toarray(args, base):
    import numpy as np

    from scvi_fast.data import CSRStore

    X = CSRStore.open(args.store).to_scipy()
    n_cells = X.shape[0]
    rng = np.random.default_rng(0)

    def run_pass(r, deadline):
        perm = rng.permutation(n_cells)
        n = 0
        for a in range(0, n_cells, args.batch_size):
            idx = perm[a : a + args.batch_size]
            x = X[idx].toarray()
            float(np.add.reduce(x, axis=None))
            n += idx.size
            if time.perf_counter() > deadline:
                break
        return n

    return _time_passes(run_pass, args.repeats, args.budget)


def _case_scvi_tools(args, base):
    import anndata as ad
    import scvi
    from scvi.dataloaders import AnnDataLoader

    adata = ad.read_h5ad(args.h5ad)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata)
    loader = AnnDataLoader(model.adata_manager, batch_size=args.batch_size, shuffle=True)

    def run_pass(r, deadline):
        n = 0
        for batch in loader:
            x = batch["X"]
            float(x.sum())
            n += x.shape[0]
            if time.perf_counter() > deadline:
                break
        return n

    return _time_passes(run_pass, args.repeats, args.budget)


def worker(args) -> None:
    if args.case in ("store", "store_mmap", "memory"):
        import scvi_fast.data  # noqa: F401  (imports before the baseline RSS)
    base = _rss_mb()
    fn = {"store": _case_scvi_fast, "store_mmap": _case_scvi_fast, "memory": _case_scvi_fast,
          "toarray": _case_toarray, "scvi_tools": _case_scvi_tools}[args.case]
    rates, per_cpu = fn(args, base)
    print(json.dumps({"rates": rates, "cells_per_cpu_s": per_cpu, "peak_rss_mb": _peak_mb(),
                      "base_rss_mb": base}))


# ------------------------------------------------------------------------------- driver
def _cpu_name() -> str:
    return C.cpu_name()


def _git_sha() -> str:
    return C.git_sha()


def _versions(python: str) -> str:
    return C.versions(python)


def _ensure_store(path: Path, n_cells: int, n_genes: int, density: float):
    sys.path.insert(0, str(ROOT))
    from scvi_fast.data import CSRStore, write_synthetic_store

    try:
        store = CSRStore.open(path)
        syn = store.manifest.get("synthetic", {})
        if (store.n_cells == n_cells and store.n_genes == n_genes
                and syn.get("density") == density):
            return store
    except (FileNotFoundError, ValueError):
        pass
    print(f"writing synthetic store {path} ({n_cells} x {n_genes}) ...", flush=True)
    t0 = time.perf_counter()
    store = write_synthetic_store(path, n_cells, n_genes=n_genes, density=density,
                                  overwrite=True)
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return store


def _warm(path: Path) -> None:
    """Read every store file once so the page cache holds it (a warm store)."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _run_case(python, case, args, store_path, h5ad=None):
    cmd = [python, __file__, "--worker", "--case", case, "--store", str(store_path),
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
           "--budget", str(args.budget), "--block-size", str(args.block_size),
           "--buffer-size", str(args.buffer_size)]
    if h5ad is not None:
        cmd += ["--h5ad", str(h5ad)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    p.add_argument("--n-genes", type=int, default=8000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--buffer-size", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=15.0, help="seconds per pass at most")
    p.add_argument("--in-memory-max", type=int, default=500_000,
                   help="largest size for the in-memory cases (host memory)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scvi_fast_bench"))
    p.add_argument("--scvi-python", default=None,
                   help="a Python with scvi-tools installed, for the scvi_tools case")
    p.add_argument("--cases", nargs="+",
                   default=["store", "store_mmap", "memory", "scvi_tools", "toarray"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--notes", default="")
    p.add_argument("--timeout", type=float, default=900)
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--h5ad", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    device, sha = _cpu_name(), _git_sha()
    versions = json.loads(_versions(sys.executable))
    if args.scvi_python:
        versions["scvi-tools"] = json.loads(_versions(args.scvi_python)).get("scvi-tools")
    rows = []
    for n_cells in args.sizes:
        store_path = args.workdir / f"synthetic_{n_cells}x{args.n_genes}_d{args.density}.store"
        _ensure_store(store_path, n_cells, args.n_genes, args.density)
        _warm(store_path)
        h5ad = None
        for case in args.cases:
            in_memory = case in ("memory", "scvi_tools", "toarray")
            if in_memory and n_cells > args.in_memory_max:
                continue
            python = sys.executable
            if case == "scvi_tools":
                if not args.scvi_python:
                    print("scvi_tools: skipped (no --scvi-python)")
                    continue
                python = args.scvi_python
                h5ad = args.workdir / f"synthetic_{n_cells}x{args.n_genes}.h5ad"
                if not h5ad.exists():  # in a child, to keep the driver small
                    code = ("import sys; from scvi_fast.data import CSRStore; "
                            "CSRStore.open(sys.argv[1]).to_anndata().write_h5ad(sys.argv[2])")
                    subprocess.run([sys.executable, "-c", code, str(store_path), str(h5ad)],
                                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            load0 = os.getloadavg()[0]
            res = _run_case(python, case, args, store_path, h5ad)
            load1 = os.getloadavg()[0]
            rates = sorted(res["rates"])
            row = {
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "git_sha": sha, "device": device, "load_avg_start": f"{load0:.2f}",
                "load_avg_end": f"{load1:.2f}", "case": case, "n_cells": n_cells,
                "n_genes": args.n_genes, "density": args.density,
                "batch_size": args.batch_size,
                "cells_per_s_median": round(rates[len(rates) // 2]),
                "cells_per_s_min": round(rates[0]), "cells_per_s_max": round(rates[-1]),
                "repeats": len(rates), "cells_per_cpu_s": round(res["cells_per_cpu_s"]),
                "peak_rss_mb": round(res["peak_rss_mb"]),
                "base_rss_mb": round(res["base_rss_mb"]),
                "versions": json.dumps(versions, sort_keys=True), "notes": args.notes,
            }
            rows.append(row)
            print(f"{case:>10} {n_cells:>9} cells: {row['cells_per_s_median']:>10,} cells/s "
                  f"[{row['cells_per_s_min']:,}-{row['cells_per_s_max']:,}]  "
                  f"{row['cells_per_cpu_s']:,} cells/CPU-s  peak RSS "
                  f"{row['peak_rss_mb']} MB (after imports {row['base_rss_mb']} MB)  "
                  f"load {load0:.1f}->{load1:.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with open(args.out, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
