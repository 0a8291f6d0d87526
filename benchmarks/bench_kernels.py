"""Time the fused ops, forward and forward+backward, against the PyTorch reference.

Every op runs at the Census shape (B=1024 cells, G=8000 genes, H=512 hidden units,
Z=50 latent dims) at several densities of the count matrix, for each selected
back-end, in the same process on the same inputs. Each timing is the median of
``--repeats`` runs (after warm-up) with the 10th and 90th percentiles; rows are
appended to ``benchmarks/results/kernels.csv`` with the date, git sha, device and
torch version. Not a test: run it by hand on an idle machine::

    python benchmarks/bench_kernels.py                         # CPU: native vs torch
    python benchmarks/bench_kernels.py --device cuda --impl triton torch torch.compile

Back-ends are just names in ``--impl``:

* ``torch``, ``native``, ``triton``: ``scvi_fast.functional.<op>(..., impl=name)``;
* ``torch.compile``: the reference compiled with ``torch.compile`` (for the NB op
  only its elementwise part, see ``_compiled_reference``; skipped, with a note,
  where compilation fails, as for the sparse matmul);
* ``dense`` (sparse_linear only): ``addmm`` of the same layer on the dense batch,
  what an ``nn.Linear`` encoder does;
* ``composed`` (nb_softmax_loglik_linear only): ``F.linear`` followed by the native
  ``nb_softmax_loglik``, the unfused way to run the decoder output layer and likelihood.

``speedup_vs_reference`` is the eager reference's median over the row's median.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scvi_fast import functional, reference  # noqa: E402

CSV_PATH = ROOT / "benchmarks" / "results" / "kernels.csv"
COLUMNS = [
    "date",
    "git_sha",
    "device",
    "torch_version",
    "op",
    "impl",
    "shape",
    "density",
    "pass",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "speedup_vs_reference",
]
OPS = ("sparse_linear", "nb_softmax_loglik", "nb_softmax_loglik_linear", "reparam_kl")
PASSES = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@dataclass
class Shape:
    B: int
    G: int
    H: int
    Z: int


def make_counts(shape: Shape, density: float, device: torch.device, gen: torch.Generator):
    """A CSR count batch (mostly small counts, a tail to ~1000) and its dense copy."""
    mask = torch.rand(shape.B, shape.G, generator=gen) < density
    counts = torch.floor(torch.exp(torch.rand(shape.B, shape.G, generator=gen) * 7.0))
    x = torch.where(mask, counts, torch.zeros(()))
    xs = x.to_sparse_csr()
    csr = (
        xs.crow_indices().to(device),
        xs.col_indices().to(torch.int32).to(device),
        xs.values().to(device),
    )
    return x.to(device), csr


# ---------------------------------------------------------------------------
# Cases: for (op, impl, density) a forward callable and a forward+backward one
# ---------------------------------------------------------------------------

Case = tuple[Callable[[], object], Callable[[], object]]
_compiled: dict[str, Callable] = {}


def _compiled_reference(op: str) -> Callable:
    if op in _compiled:
        return _compiled[op]
    if op == "nb_softmax_loglik":
        # Dynamo (torch 2.13) fails on the CSR densification, so that step and the
        # softmax stay eager and the elementwise NB formula, the expensive part, is compiled.
        nb = torch.compile(reference.log_nb_positive)

        def fn(logits, log_library, px_r, X_csr, eps=1e-8):
            x = reference.csr_to_dense(*X_csr, logits.shape[-1], dtype=logits.dtype)
            mu = torch.exp(log_library.reshape(-1, 1)) * torch.softmax(logits, dim=-1)
            return nb(x, mu, torch.exp(px_r), eps).sum(-1)

        _compiled[op] = fn
    else:
        _compiled[op] = torch.compile(getattr(reference, op))
    return _compiled[op]


def _op_fn(op: str, impl: str) -> Callable:
    if impl == "torch.compile":
        return _compiled_reference(op)
    if impl in ("torch", "native", "triton"):
        fn = getattr(functional, op)
        return lambda *a: fn(*a, impl=impl)
    raise ValueError(f"impl {impl!r} does not apply to {op}")


def sparse_linear_case(impl, shape, density, device, gen) -> Case:
    x, (indptr, indices, values) = make_counts(shape, density, device, gen)
    W = (torch.randn(shape.G, shape.H, generator=gen) / shape.G**0.5).to(device).requires_grad_()
    b = torch.zeros(shape.H, device=device, requires_grad=True)
    dy = torch.randn(shape.B, shape.H, generator=gen).to(device)
    if impl == "dense":
        # nn.Linear on log1p(x): weight (H, G), the batch dense; no gradient to the data.
        xd = torch.log1p(x)
        Wt = W.detach().t().contiguous().requires_grad_()

        def fwd():
            return torch.addmm(b, xd, Wt.t())

    else:
        fn = _op_fn("sparse_linear", impl)

        def fwd():
            return fn(indptr, indices, values, W, b, None, None, "log1p")

    def fwd_bwd():
        fwd().backward(dy)

    return fwd, fwd_bwd


def nb_case(impl, shape, density, device, gen) -> Case:
    x, csr = make_counts(shape, density, device, gen)
    logits = (torch.randn(shape.B, shape.G, generator=gen) * 2).to(device).requires_grad_()
    log_lib = torch.log(x.sum(1) + 1.0)
    px_r = torch.randn(shape.G, generator=gen).to(device).requires_grad_()
    fn = _op_fn("nb_softmax_loglik", impl)

    def fwd():
        with torch.no_grad():
            return fn(logits, log_lib, px_r, csr)

    def fwd_bwd():
        # the training case: the loss is a mean over cells
        fn(logits, log_lib, px_r, csr).mean().backward()

    return fwd, fwd_bwd


def nb_linear_case(impl, shape, density, device, gen) -> Case:
    """The decoder output layer (H -> G) and the likelihood, as in a training step."""
    x, csr = make_counts(shape, density, device, gen)
    h = torch.relu(torch.randn(shape.B, shape.H, generator=gen)).to(device).requires_grad_()
    # the decoder's layout (module._layers.OutputLinear): the (G, H) weight stored column-major
    W_t = (torch.randn(shape.G, shape.H, generator=gen) / shape.H**0.5).t().contiguous()
    W_t = W_t.to(device).requires_grad_()
    b = torch.zeros(shape.G, device=device, requires_grad=True)
    log_lib = torch.log(x.sum(1) + 1.0)
    px_r = torch.randn(shape.G, generator=gen).to(device).requires_grad_()
    if impl == "composed":
        def fn(h, W, b, log_lib, px_r, csr):
            logits = torch.nn.functional.linear(h, W, b)
            return functional.nb_softmax_loglik(logits, log_lib, px_r, csr, impl="native")
    else:
        fn = _op_fn("nb_softmax_loglik_linear", impl)

    def fwd():
        with torch.no_grad():
            return fn(h, W_t.t(), b, log_lib, px_r, csr)

    def fwd_bwd():
        fn(h, W_t.t(), b, log_lib, px_r, csr).mean().backward()

    return fwd, fwd_bwd


def reparam_case(impl, shape, density, device, gen) -> Case:
    q_m = torch.randn(shape.B, shape.Z, generator=gen).to(device).requires_grad_()
    q_v_raw = torch.randn(shape.B, shape.Z, generator=gen).to(device).requires_grad_()
    noise = torch.randn(shape.B, shape.Z, generator=gen).to(device)
    fn = _op_fn("reparam_kl", impl)

    def fwd():
        with torch.no_grad():
            return fn(q_m, q_v_raw, noise)

    def fwd_bwd():
        z, kl = fn(q_m, q_v_raw, noise)
        (z.sum() + kl.sum()).backward()

    return fwd, fwd_bwd


CASES = {
    "sparse_linear": sparse_linear_case,
    "nb_softmax_loglik": nb_case,
    "nb_softmax_loglik_linear": nb_linear_case,
    "reparam_kl": reparam_case,
}


# ---------------------------------------------------------------------------
# Timing and recording
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def quantile(xs: list[float], q: float) -> float:
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", nargs="+", default=["native", "torch", "torch.compile", "dense"],
                   help="back-ends to time (torch is always added: it is the baseline)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--densities", nargs="+", type=float, default=[0.03, 0.1, 0.3])
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--G", type=int, default=8000)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--Z", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    p.add_argument("--no-csv", action="store_true", help="print only, record nothing")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    impls = ["torch"] + [i for i in args.impl if i != "torch"]
    shape = Shape(args.B, args.G, args.H, args.Z)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "device": device_name(device),
        "torch_version": torch.__version__,
    }
    print(f"# {meta['device']}, torch {meta['torch_version']}, git {meta['git_sha']}, "
          f"load average {load_average()}")

    rows = []
    for op in args.ops:
        densities = args.densities if op != "reparam_kl" else [float("nan")]
        shape_s = (f"B={shape.B},Z={shape.Z}" if op == "reparam_kl"
                   else f"B={shape.B},G={shape.G}" + (f",H={shape.H}" if op in ("sparse_linear", "nb_softmax_loglik_linear") else ""))
        for density in densities:
            baseline: dict[str, float] = {}
            for impl in impls:
                if (impl == "dense" and op != "sparse_linear") or (
                    impl == "composed" and op != "nb_softmax_loglik_linear"
                ):
                    continue
                gen = torch.Generator().manual_seed(args.seed)
                try:
                    fwd, fwd_bwd = CASES[op](impl, shape, density, device, gen)
                    for name, fn in zip(PASSES, (fwd, fwd_bwd)):
                        ts = time_ms(fn, device, args.repeats, args.warmup)
                        med = quantile(ts, 0.5)
                        if impl == "torch":
                            baseline[name] = med
                        rows.append({
                            **meta, "op": op, "impl": impl, "shape": shape_s,
                            "density": "" if density != density else f"{density:g}",
                            "pass": name, "median_ms": f"{med:.3f}",
                            "p10_ms": f"{quantile(ts, 0.1):.3f}", "p90_ms": f"{quantile(ts, 0.9):.3f}",
                            "speedup_vs_reference": f"{baseline[name] / med:.2f}",
                        })
                        r = rows[-1]
                        print(f"{op:18s} {impl:14s} {r['density']:>5s} {name:8s} "
                              f"{med:9.2f} ms  [{r['p10_ms']}, {r['p90_ms']}]  "
                              f"x{r['speedup_vs_reference']} vs torch", flush=True)
                except Exception as exc:  # an impl unavailable here, or compile failing
                    print(f"{op:18s} {impl:14s} skipped: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}", flush=True)
                finally:
                    torch._dynamo.reset() if impl == "torch.compile" else None
                    _compiled.clear()
    _summary(rows)
    print(f"# load average at the end: {load_average()}")
    if not args.no_csv and rows:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        new = not args.csv.exists() or args.csv.stat().st_size == 0
        with args.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)
        print(f"# appended {len(rows)} rows to {args.csv}")
    return 0


def _summary(rows: list[dict]) -> None:
    """Native (or any impl) against the dense layer for sparse_linear, at a glance."""
    by = {(r["op"], r["impl"], r["density"], r["pass"]): float(r["median_ms"]) for r in rows}
    for (op, impl, dens, name), ms in sorted(by.items()):
        if op == "sparse_linear" and impl not in ("dense", "torch") and (op, "dense", dens, name) in by:
            print(f"# sparse_linear {impl} vs dense addmm, density {dens}, {name}: "
                  f"x{by[(op, 'dense', dens, name)] / ms:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
