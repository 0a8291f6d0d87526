"""Data-parallel training throughput: cells/s at 1 and N processes, and the scaling efficiency.

CPU (default): gloo, 1 and 2 processes on the same machine. Every process gets
``--threads-per-proc`` torch/numba threads (default ``cpu_count // 2``, so 1 on a 2-core
machine), the single-process baseline too, so that the ratio measures what data parallelism
adds rather than how one process uses more threads; a one-process run with all the cores is
recorded beside it for reference. ``--device cuda``: NCCL, 1 process and one per visible GPU.

Each rank trains on its own shard of a synthetic CSR store (``batch_size`` cells per rank and
step, so the global minibatch grows with the ranks: weak scaling, as users scale out).
Throughput is all ranks' cells per second of training time (validation excluded), over the
epochs that follow a warm-up epoch (which pays numba compilation and first-touch allocations):
the median and the min/max over those epochs. Scaling efficiency = cells/s(N) / (N x cells/s(1)).
On a machine shared with other work the wall-clock ratio also measures how much CPU the
scheduler grants N processes rather than one, so the cells per CPU-second of all ranks
(every epoch, every thread) are recorded too: their ratio (``cpu_efficiency``) is the
share of the work that is not spent on communication and duplicated overhead.

Rows (long schema, ``mode`` = ``<backend>/<processes>x<threads per process>``) are appended to
``ddp.csv`` after each case, with the date, git sha, device, versions and the machine's load
average (a shared machine inflates the spread); the efficiencies follow once the baseline and
the N-process case are both in.

    python benchmarks/bench_ddp.py                      # CPU, 1 and 2 processes
    python benchmarks/bench_ddp.py --device cuda        # 1 and every GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def _worker(cfg: dict):
    """One rank: train and report the per-epoch training times (rank 0 only)."""
    import scvi_fast
    from scvi_fast.functional import resolve_impl
    from scvi_fast.train import _distributed

    model = scvi_fast.SCVI(cfg["store"], n_hidden=cfg["n_hidden"], n_latent=cfg["n_latent"],
                           n_layers=cfg["n_layers"], gene_likelihood="nb", impl=cfg["impl"])
    kwargs = dict(strategy="ddp", device=cfg["device"], batch_size=cfg["batch_size"],
                  train_size=1.0, progress_bar=False, n_epochs_kl_warmup=None)
    model.train(max_epochs=1, **kwargs)  # warm-up: numba/kernel caches, first-touch pages
    cpu0 = time.process_time()
    model.train(max_epochs=cfg["epochs"], **kwargs)  # continues from the warm-up weights
    cpu = time.process_time() - cpu0  # every thread of this rank, timed epochs only
    ctx = _distributed.active()
    cpu_all = ctx.all_gather_object(cpu) if ctx is not None else [cpu]
    if not _distributed.is_main_process():
        return None
    import torch

    t = model.trainer
    return {
        "cpu_s": sum(cpu_all), "cells_trained": t.cells_trained,
        "epoch_times": list(t.epoch_times),
        "cells_per_epoch": t.cells_trained / max(t.epoch, 1),
        "threads": torch.get_num_threads(),
        "impl": resolve_impl(model.module.impl, model.device),
        "backend": _distributed.active().backend if _distributed.active() else
        ("nccl" if model.device.type == "cuda" else "gloo"),
    }


def _run(nproc: int, threads: int, cfg: dict) -> dict:
    from scvi_fast.train import _distributed

    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by each rank's setup
    t0 = time.perf_counter()
    res = _distributed.launch(_worker, (cfg,), nproc=nproc)[0]
    wall = time.perf_counter() - t0
    timed = res["epoch_times"]
    rates = [res["cells_per_epoch"] / t for t in timed]
    return {
        "n_procs": nproc, "threads_per_proc": res["threads"], "epochs_timed": len(timed),
        "rates": rates, "cells_per_s_median": C.summary(rates)["median"],
        # launch, imports and the warm-up epoch
        "startup_s": wall - sum(res["epoch_times"]), "impl": res["impl"], "backend": res["backend"],
        # CPU seconds are not inflated by other processes' load the way wall time is
        "cells_per_cpu_s": res["cells_trained"] / max(res["cpu_s"], 1e-9),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n-cells", type=int, default=None, help="default: 16000 (CPU), 400000 (CUDA)")
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="per rank; default 256 (CPU), 1024 (CUDA)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    p.add_argument("--threads-per-proc", type=int, default=None)
    p.add_argument("--impl", default="auto")
    p.add_argument("--store", help="reuse this CSR store instead of a synthetic one")
    p.add_argument("--note", default="")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import torch

    from scvi_fast.data import CSRStore, synthetic_anndata

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    n_cells = args.n_cells or (400_000 if cuda else 16_000)
    batch = args.batch_size or (1024 if cuda else 256)
    n_max = torch.cuda.device_count() if cuda else 2
    threads = args.threads_per_proc or max(1, (os.cpu_count() or 1) // 2)
    load_start = C.load_avg()
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        store = args.store
        if store is None:
            store = str(Path(tmp) / "store")
            t0 = time.perf_counter()
            ad = synthetic_anndata(n_cells=n_cells, n_genes=args.n_genes, n_batches=4,
                                   n_cell_types=8, seed=0)
            CSRStore.create(store, ad, batch_key="batch", labels_key="cell_type")
            del ad
            print(f"synthetic store {n_cells} x {args.n_genes} in {time.perf_counter() - t0:.1f} s")
        n_cells = CSRStore.open(store).n_cells
        cfg = dict(store=store, device=args.device, n_hidden=args.n_hidden, n_latent=args.n_latent,
                   n_layers=args.n_layers, batch_size=batch, epochs=args.epochs, impl=args.impl)
        cases = [(1, threads, "baseline")]
        if not cuda:
            cases.append((1, os.cpu_count() or 1, "reference: one process, all cores"))
        if n_max > 1:
            cases.append((n_max, threads, ""))
        shape = {"cells": n_cells, "genes": args.n_genes}
        config = {"n_hidden": args.n_hidden, "n_latent": args.n_latent,
                  "n_layers": args.n_layers, "batch_size_per_rank": batch,
                  "epochs_timed": args.epochs}
        rows = []
        for nproc, thr, note in cases:
            print(f"{nproc} process(es) x {thr if not cuda else '-'} thread(s) ...", flush=True)
            r = _run(nproc, thr, cfg)
            r["note"] = "; ".join(x for x in (note, args.note) if x)
            rows.append(r)
            print(f"  {r['cells_per_s_median']:,.0f} cells/s (min {min(r['rates']):,.0f}, "
                  f"max {max(r['rates']):,.0f}; startup {r['startup_s']:.1f} s)", flush=True)
            base = rows[0]
            same = r["threads_per_proc"] == base["threads_per_proc"] or cuda
            kw = dict(impl=r["impl"], mode=f"{r['backend']}/{nproc}x{r['threads_per_proc']}",
                      shape=shape, config=config | {"n_procs": nproc,
                                                    "threads_per_proc": r["threads_per_proc"],
                                                    "backend": r["backend"]}, notes=r["note"])
            out = [C.result_row("ddp", "scvi_fast", "cells_per_s", "cells/s", r["rates"], **kw),
                   C.result_row("ddp", "scvi_fast", "cells_per_cpu_s", "cells/CPU-s",
                                r["cells_per_cpu_s"], **kw),
                   C.result_row("ddp", "scvi_fast", "startup_s", "s", r["startup_s"], **kw)]
            if same:
                # efficiency of N processes against one, at the same threads per process
                r["scaling_efficiency"] = r["cells_per_s_median"] / (nproc * base["cells_per_s_median"])
                r["cpu_efficiency"] = r["cells_per_cpu_s"] / base["cells_per_cpu_s"]
                out += [C.result_row("ddp", "scvi_fast", "scaling_efficiency", "ratio",
                                     r["scaling_efficiency"], **kw),
                        C.result_row("ddp", "scvi_fast", "cpu_efficiency", "ratio",
                                     r["cpu_efficiency"], **kw)]
            if not args.no_save:
                C.record("ddp.csv", out, device=args.device, load_avg_start=load_start)
    if n_max > 1:
        last, base = rows[-1], rows[0]["cells_per_s_median"]
        print(f"scaling efficiency at {n_max} processes: {last['scaling_efficiency']:.2f} "
              f"({last['cells_per_s_median'] / base:.2f}x the 1-process throughput); "
              f"cells per CPU-second {last['cpu_efficiency']:.2f}x the 1-process value")
    print(f"load average (1, 5, 15 min): {C.load_avg()}")
    if not args.no_save:
        print(f"rows in {C.RESULTS / 'ddp.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
