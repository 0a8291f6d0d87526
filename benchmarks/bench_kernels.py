"""Time the fused ops, forward and forward+backward, against the PyTorch reference.

Every op runs at the Census shape (B=1024 cells, G=8000 genes, H=512 hidden units,
Z=50 latent dims) at several densities of the count matrix, for each selected
back-end and precision, in the same process on the same inputs. Each timing is the median
of ``--repeats`` runs after warm-up, with the 20th and 80th percentiles; rows are appended
to ``benchmarks/results/kernels.csv`` in the long schema of ``_common.result_row`` (date,
git sha, device, versions and load average on every row). Not a test: run it by hand on an
idle machine::

    python benchmarks/bench_kernels.py                         # CPU: native vs torch
    python benchmarks/bench_kernels.py --device cuda --impl triton torch dense --graph
    python benchmarks/bench_kernels.py --device cuda --sweep   # every launch candidate

Back-ends are names in ``--impl``:

* ``torch``, ``native``, ``triton``: ``scvi_fast.functional.<op>(..., impl=name)``; for
  ``sparse_linear`` once per ``--methods`` entry (``gather``: a sum over the stored entries;
  ``dense``: the batch densified on the device and a GEMM);
* ``torch.compile``: the reference compiled with ``torch.compile`` (for the NB op
  only its elementwise part, see ``_compiled_reference``; skipped, with a note,
  where compilation fails, as for the sparse matmul);
* ``dense`` (sparse_linear only): ``addmm`` of the same layer on a dense input that is already
  on the device, what an ``nn.Linear`` encoder does (cuBLAS on a GPU): the bar for the first
  layer;
* ``composed`` (nb_softmax_loglik_linear only): ``F.linear`` followed by the native
  ``nb_softmax_loglik``, the unfused way to run the decoder output layer and likelihood.

Precisions (``--precision``, GPU): ``fp32`` (TF32 off), ``tf32`` (TF32 GEMMs) and ``bf16``
(autocast; the NB op gets bfloat16 logits). ``--graph`` (GPU) also times each case replayed
from a captured CUDA graph, the figure for a graph-captured training step (no launch
overhead), with the L2 cache flushed before every replay. ``speedup_vs_reference`` rows are
the eager reference's median over the case's median, same precision. Timings on a CPU
shared with other work are noisy; the load average is recorded beside every row.

``--sweep`` (GPU) times every launch candidate of every Triton kernel (see
``scvi_fast/kernels/triton/_configs.py``) inside its op, prints the fastest per kernel and
records one row per candidate (``config`` holds the kernel and the candidate); the default
(first) candidate of each list in the kernel files is what a run without
``SCVI_FAST_AUTOTUNE=1`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _common as C  # noqa: E402

from scvi_fast import functional, reference  # noqa: E402
from scvi_fast.reference._random import random_csr  # noqa: E402

CSV_NAME = "kernels.csv"
OPS = ("sparse_linear", "nb_softmax_loglik", "nb_softmax_loglik_linear", "zinb_softmax_loglik",
       "poisson_softmax_loglik", "reparam_kl")
PASSES = ("fwd", "fwd+bwd")
PRECISIONS = ("fp32", "tf32", "bf16")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@dataclass
class Shape:
    B: int
    G: int
    H: int
    Z: int


def make_counts(shape: Shape, density: float, device: torch.device, gen: torch.Generator,
                pad: float = 0.0):
    """A CSR count batch (mostly small counts, a tail to ~1000) and its dense copy.

    ``pad``: extra capacity past ``indptr[-1]`` as a fraction of the stored entries (a
    training step's static buffers), filled with NaN values and out-of-range gene ids.
    """
    csr = random_csr(gen, shape.B, shape.G, density, max_count=1096, index_dtype=torch.int32,
                     indptr_dtype=torch.int64)
    x = csr.dense(shape.G, torch.float32)
    extra = int(pad * csr.values.numel())
    if extra:
        csr = csr.padded(extra, shape.G)
    return x.to(device), csr.to(device)


# ---------------------------------------------------------------------------
# Precision settings
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def precision(name: str, device: torch.device):
    """TF32 on or off for CUDA GEMMs, and bf16 autocast, for the duration of the block."""
    if device.type != "cuda":
        if name == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = name in ("tf32", "bf16")
    try:
        if name == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

_FLUSH: dict[torch.device, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Overwrite a 256 MB buffer so that the next kernel reads its inputs from HBM."""
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
    _FLUSH[device].zero_()


def _events_ms(call: Callable, device: torch.device, repeats: int, flush: bool) -> list[float]:
    """GPU time of each of ``repeats`` calls in ms, between CUDA events (the L2 cache
    overwritten before each call when ``flush``)."""
    torch.cuda.synchronize(device)
    out = []
    for _ in range(repeats):
        if flush:
            flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        out.append(start.elapsed_time(end))
    return out


def time_ms(fn: Callable, device: torch.device, repeats: int, warmup: int,
            flush: bool = False) -> list[float]:
    """Wall time of each call in ms, after ``warmup`` calls: CUDA events around each call on a
    GPU (launch overhead included, as an eager step pays it), ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return _events_ms(fn, device, repeats, flush)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def capture(fn: Callable, device: torch.device, warmup: int = 3):
    """``(graph, out)``: ``fn`` captured as a CUDA graph (after warm-up calls on a side stream,
    as capture requires; the Triton kernels compile and pick their configurations there) and
    what the captured call returned (tensors that each replay rewrites)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out


def graph_time_ms(fn: Callable, device: torch.device, repeats: int, warmup: int = 3,
                  flush: bool = True) -> list[float]:
    """GPU time of one replay of ``fn`` captured as a CUDA graph (no launch overhead), in ms;
    with ``flush`` the L2 cache is overwritten before every replay (inputs come from HBM)."""
    graph, _ = capture(fn, device, warmup)
    try:
        return _events_ms(graph.replay, device, repeats, flush)
    finally:
        del graph


# ---------------------------------------------------------------------------
# Cases: for (op, impl, method, density, precision) a forward and a forward+backward callable
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
    elif op == "zinb_softmax_loglik":
        zinb = torch.compile(reference.log_zinb_positive)

        def fn(logits, log_library, px_r, dropout_logits, X_csr, eps=1e-8):
            x = reference.csr_to_dense(*X_csr, logits.shape[-1], dtype=logits.dtype)
            mu = torch.exp(log_library.reshape(-1, 1)) * torch.softmax(logits, dim=-1)
            return zinb(x, mu, torch.exp(px_r), dropout_logits, eps).sum(-1)

        _compiled[op] = fn
    elif op == "poisson_softmax_loglik":
        terms = torch.compile(lambda x, rate: torch.xlogy(x, rate) - rate - torch.lgamma(x + 1))

        def fn(logits, log_library, X_csr):
            x = reference.csr_to_dense(*X_csr, logits.shape[-1], dtype=logits.dtype)
            rate = torch.exp(log_library.reshape(-1, 1)) * torch.softmax(logits, dim=-1)
            return terms(x, rate).sum(-1)

        _compiled[op] = fn
    else:
        _compiled[op] = torch.compile(getattr(reference, op))
    return _compiled[op]


def _op_fn(op: str, impl: str) -> Callable:
    if impl == "torch.compile":
        return _compiled_reference(op)
    if impl in ("torch", "native", "triton"):
        fn = getattr(functional, op)
        return lambda *a, **kw: fn(*a, impl=impl, **kw)
    raise ValueError(f"impl {impl!r} does not apply to {op}")


def _backward(out, leaves, grad):
    torch.autograd.grad(out, leaves, grad)


def sparse_linear_case(impl, method, shape, density, device, gen, prec, pad=0.0) -> Case:
    x, (indptr, indices, values) = make_counts(shape, density, device, gen, pad)
    W = (torch.randn(shape.G, shape.H, generator=gen) / shape.G**0.5).to(device).requires_grad_()
    b = torch.zeros(shape.H, device=device, requires_grad=True)
    dy = torch.randn(shape.B, shape.H, generator=gen).to(device)
    if impl == "dense":
        # nn.Linear on log1p(x): weight (H, G), the batch dense; no gradient to the data.
        xd = torch.log1p(x)
        Wt = W.detach().t().contiguous().requires_grad_()

        def fwd():
            with precision(prec, device):
                return torch.addmm(b, xd, Wt.t())

        leaves = [Wt, b]
    else:
        fn = _op_fn("sparse_linear", impl)
        kw = {} if impl == "torch.compile" else {"method": method}

        def fwd():
            with precision(prec, device):
                return fn(indptr, indices, values, W, b, None, None, "log1p", **kw)

        leaves = [W, b]

    def fwd_bwd():
        y = fwd()
        _backward(y, leaves, dy.to(y.dtype))

    return fwd, fwd_bwd


def nb_case(impl, method, shape, density, device, gen, prec, pad=0.0) -> Case:
    x, csr = make_counts(shape, density, device, gen, pad)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    logits = (torch.randn(shape.B, shape.G, generator=gen) * 2).to(device, dtype).requires_grad_()
    log_lib = torch.log(x.sum(1) + 1.0)
    px_r = torch.randn(shape.G, generator=gen).to(device).requires_grad_()
    fn = _op_fn("nb_softmax_loglik", impl)
    ones = torch.full((shape.B,), 1.0 / shape.B, device=device)

    def fwd():
        with torch.no_grad():
            return fn(logits, log_lib, px_r, csr)

    def fwd_bwd():
        # the training case: the loss is a mean over cells
        _backward(fn(logits, log_lib, px_r, csr), [logits, px_r], ones)

    return fwd, fwd_bwd


def zinb_case(impl, method, shape, density, device, gen, prec, pad=0.0) -> Case:
    """ZINB with a (G,) dispersion and (B, G) dropout logits; gradients to all three."""
    x, csr = make_counts(shape, density, device, gen, pad)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32  # Triton reads bf16 logits
    logits = (torch.randn(shape.B, shape.G, generator=gen) * 2).to(device, dtype).requires_grad_()
    log_lib = torch.log(x.sum(1) + 1.0)
    px_r = torch.randn(shape.G, generator=gen).to(device).requires_grad_()
    pi = torch.randn(shape.B, shape.G, generator=gen).to(device).requires_grad_()
    fn = _op_fn("zinb_softmax_loglik", impl)
    ones = torch.full((shape.B,), 1.0 / shape.B, device=device)

    def fwd():
        with torch.no_grad():
            return fn(logits, log_lib, px_r, pi, csr)

    def fwd_bwd():
        _backward(fn(logits, log_lib, px_r, pi, csr), [logits, px_r, pi], ones)

    return fwd, fwd_bwd


def poisson_case(impl, method, shape, density, device, gen, prec, pad=0.0) -> Case:
    x, csr = make_counts(shape, density, device, gen, pad)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32  # Triton reads bf16 logits
    logits = (torch.randn(shape.B, shape.G, generator=gen) * 2).to(device, dtype).requires_grad_()
    log_lib = torch.log(x.sum(1) + 1.0).requires_grad_()
    fn = _op_fn("poisson_softmax_loglik", impl)
    ones = torch.full((shape.B,), 1.0 / shape.B, device=device)

    def fwd():
        with torch.no_grad():
            return fn(logits, log_lib, csr)

    def fwd_bwd():
        _backward(fn(logits, log_lib, csr), [logits, log_lib], ones)

    return fwd, fwd_bwd


def nb_linear_case(impl, method, shape, density, device, gen, prec, pad=0.0) -> Case:
    """The decoder output layer (H -> G) and the likelihood, as in a training step."""
    x, csr = make_counts(shape, density, device, gen, pad)
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
    ones = torch.full((shape.B,), 1.0 / shape.B, device=device)

    def fwd():
        with torch.no_grad(), precision(prec, device):
            return fn(h, W_t.t(), b, log_lib, px_r, csr)

    def fwd_bwd():
        with precision(prec, device):
            ll = fn(h, W_t.t(), b, log_lib, px_r, csr)
        _backward(ll, [h, W_t, b, px_r], ones)

    return fwd, fwd_bwd


def reparam_case(impl, method, shape, density, device, gen, prec, pad=0.0) -> Case:
    q_m = torch.randn(shape.B, shape.Z, generator=gen).to(device).requires_grad_()
    q_v_raw = torch.randn(shape.B, shape.Z, generator=gen).to(device).requires_grad_()
    noise = torch.randn(shape.B, shape.Z, generator=gen).to(device)
    gz = torch.randn(shape.B, shape.Z, generator=gen).to(device)
    gk = torch.randn(shape.B, generator=gen).to(device)
    fn = _op_fn("reparam_kl", impl)

    def fwd():
        with torch.no_grad():
            return fn(q_m, q_v_raw, noise)

    def fwd_bwd():
        z, kl = fn(q_m, q_v_raw, noise)
        torch.autograd.grad([z, kl], [q_m, q_v_raw], [gz, gk])

    return fwd, fwd_bwd


CASES = {
    "sparse_linear": sparse_linear_case,
    "nb_softmax_loglik": nb_case,
    "nb_softmax_loglik_linear": nb_linear_case,
    "zinb_softmax_loglik": zinb_case,
    "poisson_softmax_loglik": poisson_case,
    "reparam_kl": reparam_case,
}


def applies(op: str, impl: str, prec: str, device: torch.device) -> bool:
    """Whether ``(op, impl, precision)`` is a meaningful case on ``device``."""
    if impl == "dense" and op != "sparse_linear":
        return False
    if impl == "composed" and op != "nb_softmax_loglik_linear":
        return False
    if prec == "fp32":
        return True
    if device.type != "cuda" or op == "reparam_kl":
        return False  # TF32 and bf16 are GPU settings; reparam_kl stays in fp32
    if op in ("nb_softmax_loglik", "zinb_softmax_loglik", "poisson_softmax_loglik"):
        return prec == "bf16" and impl == "triton"  # bf16 logits: Triton reads them directly
    return impl not in ("native", "composed", "torch.compile")


def nb_bandwidth(shape: Shape, nnz: int, elem: int) -> tuple[int, int]:
    """Compulsory bytes (forward, backward) of the NB op at this shape (int32 indices)."""
    return reference.nb_bytes_moved(shape.B, shape.G, nnz, elem=elem, index_elem=4,
                                    value_elem=4, indptr_elem=8)


# ---------------------------------------------------------------------------
# Sweep of the Triton launch candidates
# ---------------------------------------------------------------------------


def sweep_cases(shape: Shape):
    """``(kernel, op, method, precision, pass, candidates)`` for every tuned Triton kernel."""
    from scvi_fast.kernels.triton import _nb_bwd as nbb
    from scvi_fast.kernels.triton import _nb_fwd as nbf
    from scvi_fast.kernels.triton import _sparse_linear as sl

    out = []
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out += [
            ("nb_fwd", "nb_softmax_loglik", "", prec, "fwd", nbf.fwd_candidates(shape.G, dtype)),
            ("nb_bwd_dense", "nb_softmax_loglik", "", prec, "fwd+bwd",
             nbb.bwd_dense_candidates(shape.G, dtype)),
            ("nb_bwd_sparse", "nb_softmax_loglik", "", prec, "fwd+bwd",
             nbb.bwd_sparse_candidates(dtype)),
            ("densify", "sparse_linear", "dense", prec, "fwd", sl.densify_candidates()),
        ]
    out.append(("segment_gather", "sparse_linear", "gather", "fp32", "fwd+bwd",
                sl.gather_candidates(shape.H, torch.float32)))
    return out


def run_sweep(args, shape, device, density, record) -> None:
    from scvi_fast.kernels.triton._configs import forced

    for kernel, op, method, prec, name, cands in sweep_cases(shape):
        gen = torch.Generator().manual_seed(args.seed)
        fwd, fwd_bwd = CASES[op]("triton", method, shape, density, device, gen, prec, args.pad)
        fn = fwd if name == "fwd" else fwd_bwd
        results = []
        for i, cfg in enumerate(cands):
            with forced(kernel, cfg):
                ts = (graph_time_ms(fn, device, args.repeats) if device.type == "cuda"
                      else time_ms(fn, device, args.repeats, args.warmup))
            med = statistics.median(ts)
            results.append((med, i, cfg))
            print(f"sweep {kernel:15s} {prec:5s} #{i} {med:8.4f} ms  {cfg}"
                  f"{'  (default)' if i == 0 else ''}", flush=True)
            record([C.result_row(
                f"kernel:{op}", "scvi_fast", "time", "ms", ts, impl="triton",
                mode=f"{name},{prec},{'graph' if device.type == 'cuda' else 'eager'}",
                shape=dict(B=shape.B, G=shape.G, H=shape.H, density=density),
                config=dict(sweep=kernel, candidate=i, default=i == 0, **cfg),
            )])
        best = min(results, key=lambda r: r[0])
        print(f"  best {kernel} ({prec}): #{best[1]} {best[2]} at {best[0]:.4f} ms; default "
              f"{results[0][0]:.4f} ms ({results[0][0] / best[0]:.2f}x)", flush=True)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", nargs="+", default=["native", "torch", "torch.compile", "dense"],
                   help="back-ends to time (torch is always added: it is the baseline)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--methods", nargs="+", default=["gather", "dense"],
                   choices=("gather", "dense"), help="sparse_linear methods of each back-end")
    p.add_argument("--precision", nargs="+", default=None, choices=PRECISIONS,
                   help="default: fp32 on the CPU; fp32 tf32 bf16 on a GPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--densities", nargs="+", type=float, default=[0.03, 0.1, 0.3])
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--G", type=int, default=8000)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--Z", type=int, default=50)
    p.add_argument("--pad", type=float, default=0.0,
                   help="padded CSR capacity past the stored entries, as a fraction of them")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--graph", action="store_true",
                   help="also time CUDA-graph replays (GPU; L2 flushed before each)")
    p.add_argument("--sweep", action="store_true",
                   help="time every Triton launch candidate (GPU; at the first density)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-csv", action="store_true", help="print only, record nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    precs = args.precision or (["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32"])
    impls = ["torch"] + [i for i in args.impl if i != "torch"]
    shape = Shape(args.B, args.G, args.H, args.Z)
    load_start = C.load_avg()
    print(f"# {C.device_name(str(device))}, torch {torch.__version__}, git {C.git_sha()}, "
          f"load average {load_start}")

    def record(rows):
        if not args.no_csv and rows:
            C.record(CSV_NAME, rows, device=str(device), load_avg_start=load_start)

    if args.sweep:
        run_sweep(args, shape, device, args.densities[0], record)
        return 0

    for op in args.ops:
        densities = args.densities if op != "reparam_kl" else [float("nan")]
        for density in densities:
            dims = dict(B=shape.B, Z=shape.Z) if op == "reparam_kl" else dict(B=shape.B, G=shape.G)
            if op in ("sparse_linear", "nb_softmax_loglik_linear"):
                dims["H"] = shape.H
            if density == density:
                dims["density"] = density
            for prec in precs:
                baseline: dict[str, float] = {}
                for impl in impls:
                    if not applies(op, impl, prec, device):
                        continue
                    methods = args.methods if op == "sparse_linear" and impl in (
                        "torch", "native", "triton") else [""]
                    for method in methods:
                        rows = _time_case(args, op, impl, method, prec, shape, density, device,
                                          dims, baseline)
                        record(rows)
    print(f"# load average at the end: {C.load_avg()}")
    return 0


def _time_case(args, op, impl, method, prec, shape, density, device, dims, baseline):
    gen = torch.Generator().manual_seed(args.seed)
    label = impl + (f":{method}" if method else "")
    provider = "torch" if impl in ("torch", "torch.compile", "dense") else "scvi_fast"
    config = {"method": method} if method else {}
    if impl == "dense":
        config["baseline"] = "addmm of a dense input already on the device"
    rows = []
    try:
        fwd, fwd_bwd = CASES[op](impl, method, shape, density, device, gen, prec, args.pad)
        for name, fn in zip(PASSES, (fwd, fwd_bwd)):
            timings = [("eager", time_ms(fn, device, args.repeats, args.warmup))]
            if args.graph and device.type == "cuda" and impl != "torch.compile":
                timings.append(("graph", graph_time_ms(fn, device, args.repeats)))
            for timing, ts in timings:
                med = statistics.median(ts)
                mode = f"{name},{prec},{timing}"
                time_row = C.result_row(f"kernel:{op}", provider, "time", "ms", ts, impl=label,
                                        mode=mode, shape=dims, config=config)
                rows.append(time_row)
                key = (name, timing)
                if impl == "torch" and method in ("", "gather"):
                    baseline[key] = med
                speedup = baseline.get(key, float("nan")) / med
                if key in baseline:
                    rows.append(C.result_row(f"kernel:{op}", provider, "speedup_vs_reference",
                                             "x", speedup, impl=label, mode=mode, shape=dims,
                                             config=config))
                extra = ""
                if op == "nb_softmax_loglik" and impl == "triton":
                    elem = 2 if prec == "bf16" else 4
                    nnz = int(round(density * shape.B * shape.G))
                    fwd_b, bwd_b = nb_bandwidth(shape, nnz, elem)
                    nbytes = fwd_b if name == "fwd" else fwd_b + bwd_b
                    gbs = [nbytes / t / 1e6 for t in ts]
                    rows.append(C.result_row(f"kernel:{op}", provider, "bandwidth", "GB/s", gbs,
                                             impl=label, mode=mode, shape=dims,
                                             config=dict(config, bytes=nbytes,
                                                         counted="compulsory")))
                    extra = f"  {statistics.median(gbs):8.1f} GB/s"
                print(f"{op:24s} {label:14s} {dims.get('density', ''):>5} {prec:4s} {name:7s} "
                      f"{timing:5s} {med:9.3f} ms  [{time_row['p20']:.3f}, "
                      f"{time_row['p80']:.3f}]  x{speedup:.2f} vs torch{extra}", flush=True)
    except Exception as exc:  # an impl unavailable here, or compile failing
        print(f"{op:24s} {label:14s} skipped: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:160] if str(exc) else ''}", flush=True)
    finally:
        if impl == "torch.compile":
            torch._dynamo.reset()
        _compiled.clear()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
