"""Check the CUDA-graph training step against the eager one on a GPU, and time both.

Trains the same small model from the same initial weights three ways (``eager``: a fresh device
copy of every minibatch, one kernel launch per op; ``static``: the graph's step body on static
buffers without capture; ``graph``: captured and replayed), then checks that the three agree
(parameters and per-epoch ELBOs within a float32 tolerance: GPU kernels that sum with atomics
are not bitwise reproducible, so a bitwise check would fail between any two eager runs too),
that graphs were captured and replayed without falling back, and reports the time per step of
each mode at the Census preset shape. With ``--cpu`` the eager and static modes are compared on
the CPU at a tiny size (bitwise there).

    python benchmarks/gpu_check_step.py            # on a GPU machine
    python benchmarks/gpu_check_step.py --cpu      # smoke test here

Rows go to ``benchmarks/results/step.csv``; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

import _common as C


def _data(n_cells, n_genes, n_batches, density, seed=0):
    from scvi_fast.data import synthetic_anndata

    ad = synthetic_anndata(n_cells=n_cells, n_genes=n_genes, n_batches=n_batches,
                           n_cell_types=8, density=density, seed=seed)
    return ad, ad.obs["batch"].cat.codes.to_numpy().astype(np.int64)


def _options(a) -> dict:
    """The model options of the check (gene-label reads the labels, all 0 here)."""
    return {"gene_likelihood": a.gene_likelihood, "dispersion": a.dispersion,
            "latent_distribution": a.latent_distribution}


def _train(ad, codes, mode, device, a, state=None):
    import torch

    from scvi_fast.data import CSRLoader
    from scvi_fast.module import VAE
    from scvi_fast.train import Trainer

    torch.manual_seed(0)
    module = VAE(ad.n_vars, n_batch=a.n_batches, n_hidden=a.n_hidden, n_latent=a.n_latent,
                 n_layers=a.n_layers, impl=a.impl, **_options(a))
    if state is not None:
        module.load_state_dict(state)
    n = ad.n_obs
    perm = np.random.default_rng(0).permutation(n)
    n_val = n // 10
    pin = str(device).startswith("cuda")
    kw = dict(batch_codes=codes, pin_memory=pin)
    train = CSRLoader(ad, batch_size=a.batch_size, shuffle=True, seed=1,
                      indices=np.sort(perm[n_val:]), **kw)
    val = CSRLoader(ad, batch_size=a.batch_size, shuffle=False, indices=np.sort(perm[:n_val]),
                    **kw)
    trainer = Trainer(module, train, val, device=device, lr=a.lr, n_epochs_kl_warmup=2,
                      progress_bar=False, step_mode=mode, seed=0,
                      allow_tf32=a.precision == "tf32",
                      precision="bf16-mixed" if a.precision == "bf16-mixed" else "32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(a.epochs)
    fell_back = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    return trainer, fell_back


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny CPU smoke test (eager vs static)")
    p.add_argument("--n-cells", type=int, default=40_000)
    p.add_argument("--n-genes", type=int, default=8000)
    p.add_argument("--n-batches", type=int, default=128)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--precision", default="32", choices=["32", "tf32", "bf16-mixed"])
    p.add_argument("--impl", default="auto")
    p.add_argument("--gene-likelihood", default="nb", choices=["zinb", "nb", "poisson"],
                   help="the model's gene likelihood (nb: the Census model)")
    p.add_argument("--dispersion", default="gene",
                   choices=["gene", "gene-batch", "gene-label", "gene-cell"])
    p.add_argument("--latent-distribution", default="normal", choices=["normal", "ln"])
    a = p.parse_args(argv)
    if a.cpu:
        a.n_cells, a.n_genes, a.n_batches, a.epochs = 600, 300, 4, 2
        a.n_hidden, a.n_latent, a.n_layers, a.batch_size, a.lr = 32, 8, 2, 128, 1e-3
        device, modes = "cpu", ("eager", "static")
    else:
        a.n_hidden, a.n_latent, a.n_layers, a.batch_size, a.lr = 512, 50, 2, 1024, 1e-4
        device, modes = "cuda", ("eager", "static", "graph")
    import torch

    load0 = C.load_avg()
    t0 = time.perf_counter()
    ad, codes = _data(a.n_cells, a.n_genes, a.n_batches, a.density)
    print(f"data {ad.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    torch.manual_seed(0)
    from scvi_fast.module import VAE

    init = VAE(ad.n_vars, n_batch=a.n_batches, n_hidden=a.n_hidden, n_latent=a.n_latent,
               n_layers=a.n_layers, **_options(a)).state_dict()
    results, failures = {}, []
    shape = {"B": a.batch_size, "G": a.n_genes, "H": a.n_hidden, "Z": a.n_latent,
             "layers": a.n_layers, "cells": a.n_cells}
    for mode in modes:
        trainer, fell_back = _train(ad, codes, mode, device, a, state=init)
        steps = len(trainer.train_loader)
        per_step = [t / steps * 1e3 for t in trainer.epoch_times[1:]]
        rates = [trainer.train_loader.n_cells / t for t in trainer.epoch_times[1:]]
        results[mode] = trainer
        extra = ""
        if mode == "graph":
            extra = f", {trainer.runner.n_graphs} graphs, mode now {trainer.runner.mode}"
            if fell_back or trainer.runner.mode != "graph":
                failures.append(f"graph mode fell back: {fell_back}")
        print(f"{mode:<7} {np.median(per_step):8.3f} ms/step  {np.median(rates):10.0f} cells/s  "
              f"elbo_validation {trainer.history['elbo_validation'][-1]:.4f}{extra}", flush=True)
        C.record("step.csv", [C.result_row(
            "train_step", "scvi_fast", "time_per_step", "ms", per_step, impl=a.impl,
            mode=f"{mode},{a.precision}", shape=shape, config={"epochs": a.epochs}),
            C.result_row("train_step", "scvi_fast", "cells_per_s", "cells/s", rates,
                         impl=a.impl, mode=f"{mode},{a.precision}", shape=shape)],
            device=device, load_avg_start=load0)
    ref = results["eager"]
    for mode, tr in results.items():
        if mode == "eager":
            continue
        # bitwise on the CPU; on a GPU float32 rounding differences of atomics-based sums grow
        # over a few hundred Adam steps: 1e-3 relative on the ELBO, 5e-2 absolute on weights
        # initialised at ~1/sqrt(fan_in), far below any real disagreement (a wrong minibatch
        # or a stale buffer moves the ELBO by percents)
        exact = device == "cpu"
        for name in ("elbo_train", "elbo_validation"):
            x, y = np.array(ref.history[name]), np.array(tr.history[name])
            ok = np.array_equal(x, y) if exact else np.allclose(x, y, rtol=1e-3)
            if not ok:
                failures.append(f"{mode}: {name} {y} vs eager {x}")
        for k, v in ref.module.state_dict().items():
            w = tr.module.state_dict()[k]
            ok = torch.equal(v, w) if exact else torch.allclose(
                v.float(), w.float(), atol=5e-2, rtol=0)
            if not ok:
                failures.append(f"{mode}: parameter {k} differs (max "
                                f"{(v.float() - w.float()).abs().max().item():.3g})")
    for f in failures:
        print("FAIL", f)
    print("all step checks passed" if not failures else f"{len(failures)} step checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
