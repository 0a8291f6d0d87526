"""Minibatch loading throughput and peak memory: scvi_fast's CSR loader against baselines.

Cases, each run in its own process so that peak RSS is its own:

* ``store``: ``CSRLoader`` on an on-disk CSR store whose pages are in the page cache (warm);
  the store checks each chunk of counts the first time it is read (``--read-checks off``
  measures without: the first pass pays for the checks, later passes do not);
* ``store_mmap``: the same, gathering straight from the memory map (``stage=False``);
* ``memory``: ``CSRLoader`` on an in-memory AnnData (CSR ``X``);
* ``scvi_tools``: scvi-tools' ``AnnDataLoader`` on the same in-memory AnnData (needs a Python
  with scvi-tools, ``--scvi-python``; skipped otherwise);
* ``toarray``: a plain loop of ``adata.X[idx].toarray()`` over shuffled batches.

Every case reads each minibatch's values once (a sum), as a training step would. Throughput is
cells/s over whole passes (median and 20th/80th percentiles over ``--repeats``), and cells per
CPU-second of the process (all its threads), which is less sensitive to other load; peak RSS is
the process's maximum resident set, and ``base_rss_mb`` the resident set after imports, before
any data. The synthetic store is the one ``bench_train.py`` uses for the same shape (reused when
it exists). Rows (long schema, ``mode`` = the case) are appended to ``loader.csv`` after each
case, with the CPU, versions, git sha and load average (the machine may be shared: compare rows
taken in the same run).

Usage::

    python benchmarks/bench_loader.py --sizes 200000 2000000 --workdir /tmp/scvi_fast_bench \\
        --scvi-python /path/to/venv-with-scvi-tools/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: who reads in each case (the ``provider`` of its rows)
PROVIDER = {"store": "scvi_fast", "store_mmap": "scvi_fast", "memory": "scvi_fast",
            "scvi_tools": "scvi-tools", "toarray": "scipy"}


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

    checks = args.read_checks[-1] == "on"
    stage = False if args.case == "store_mmap" else None
    kw = dict(batch_size=args.batch_size, shuffle=True, seed=0, block_size=args.block_size,
              buffer_size=args.buffer_size, stage=stage)
    # warm-up: compile (cached) kernels, touch the page cache; on a store opened apart, so
    # that the timed store has checked none of its chunks (its first pass pays for them)
    for i, mb in enumerate(CSRLoader(CSRStore.open(args.store, check_reads=checks), **kw)):
        if i == 20:
            break
    store = CSRStore.open(args.store, check_reads=checks)
    if args.case == "memory":
        source = store.to_anndata()
        del store
    else:
        source = store
    loader = CSRLoader(source, **kw)

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
    base = C.rss_mb()
    fn = {"store": _case_scvi_fast, "store_mmap": _case_scvi_fast, "memory": _case_scvi_fast,
          "toarray": _case_toarray, "scvi_tools": _case_scvi_tools}[args.case]
    rates, per_cpu = fn(args, base)
    print(json.dumps({"rates": rates, "cells_per_cpu_s": per_cpu, "peak_rss_mb": C.peak_rss_mb(),
                      "base_rss_mb": base}))


# ------------------------------------------------------------------------------- driver
def _warm(path: Path) -> None:
    """Read every store file once so the page cache holds it (a warm store)."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _run_case(python, case, args, store_path, h5ad=None, checks="on"):
    wargs = ["--case", case, "--store", str(store_path), "--batch-size", str(args.batch_size),
             "--read-checks", checks,
             "--repeats", str(args.repeats), "--budget", str(args.budget),
             "--block-size", str(args.block_size), "--buffer-size", str(args.buffer_size)]
    if h5ad is not None:
        wargs += ["--h5ad", str(h5ad)]
    return C.run_worker(python, __file__, wargs, args.timeout)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    p.add_argument("--n-genes", type=int, default=8000)
    p.add_argument("--n-batches", type=int, default=128)
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
    p.add_argument("--read-checks", nargs="+", choices=["on", "off"], default=["on"],
                   help="store cases: check chunks of counts as they are first read (each "
                   "setting given is run in turn)")
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
    config = {"batch_size": args.batch_size, "block_size": args.block_size,
              "buffer_size": args.buffer_size, "budget_s": args.budget, "threads": os.cpu_count()}
    for n_cells in args.sizes:
        key = (n_cells, args.n_genes, args.n_batches, args.density)
        store_path = C.synthetic_store(C.synthetic_path(args.workdir, *key, ".store"), *key)
        _warm(store_path)
        shape = {"cells": n_cells, "genes": args.n_genes, "density": args.density}
        runs = [(case, checks) for case in args.cases
                for checks in (args.read_checks if case.startswith("store") else ["on"])]
        for case, checks in runs:
            in_memory = case in ("memory", "scvi_tools", "toarray")
            if in_memory and n_cells > args.in_memory_max:
                continue
            python, h5ad = sys.executable, None
            if case == "scvi_tools":
                if not args.scvi_python or not C.has_module(args.scvi_python, "scvi"):
                    print("scvi_tools: skipped (no --scvi-python with scvi-tools)")
                    continue
                python = args.scvi_python
                h5ad = C.synthetic_h5ad(C.synthetic_path(args.workdir, *key, ".h5ad"), *key)
            load0 = C.load_avg()
            res = _run_case(python, case, args, store_path, h5ad, checks)
            kw = dict(mode=case, shape=shape, config=config | {"read_checks": checks},
                      notes=args.notes)
            rows = [C.result_row("loader", PROVIDER[case], "cells_per_s", "cells/s",
                                 res["rates"], **kw),
                    C.result_row("loader", PROVIDER[case], "cells_per_cpu_s", "cells/CPU-s",
                                 res["cells_per_cpu_s"], **kw),
                    C.result_row("loader", PROVIDER[case], "peak_rss_mb", "MB",
                                 res["peak_rss_mb"], **kw),
                    C.result_row("loader", PROVIDER[case], "base_rss_mb", "MB",
                                 res["base_rss_mb"], **kw)]
            path = C.record("loader.csv", rows, python=python, load_avg_start=load0)
            st = C.summary(res["rates"])
            print(f"{case:>10} {n_cells:>9} cells (checks {checks}): "
                  f"{st['median']:>12,.0f} cells/s "
                  f"[p20 {st['p20']:,.0f}, p80 {st['p80']:,.0f}]  "
                  f"{res['cells_per_cpu_s']:,.0f} cells/CPU-s  peak RSS "
                  f"{res['peak_rss_mb']:.0f} MB (after imports {res['base_rss_mb']:.0f} MB)  "
                  f"load {load0} -> {C.load_avg()}; passes "
                  f"{', '.join(f'{r:,.0f}' for r in res['rates'])}", flush=True)
    print(f"rows in {C.RESULTS / 'loader.csv'}")


if __name__ == "__main__":
    main()
