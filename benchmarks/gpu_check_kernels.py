#!/usr/bin/env python
"""Compile every Triton kernel on a CUDA device, check it against the references, time it.

On a GPU machine (default: the Census shape B=1024, G=8000, H=512, 10% non-zeros)::

    python benchmarks/gpu_check_kernels.py

Checks (exit status 1 when one fails), each value and every gradient with a non-unit
upstream gradient:

* lgamma / digamma (plain Triton) against torch over 1e-4 .. 1e6;
* sparse_linear, both methods (``gather``; ``dense``: densified on the device + GEMM):
  float64 against the float64 reference; float32 (TF32 off) against the float64 truth within
  a small factor of torch's own float32 error; the dense method with TF32 and under bf16
  autocast against the float64 truth, within a factor of the error of torch's own GEMM on a
  dense input at that precision;
* nb_softmax_loglik with float64, float32 and bfloat16 logits (within k * the sum of |terms|,
  as in the tests; the bf16 logits' gradient within one bf16 rounding);
* zinb_softmax_loglik (px_r ``(G,)`` and ``(B, G)``) and poisson_softmax_loglik with float64
  and float32 inputs (within k * the sum of |terms|, as in the tests);
* reparam_kl in float64 and float32;
* the CSR contract: a poisoned padded tail past ``indptr[-1]`` changes no output or gradient
  (int32 CSR arrays);
* CUDA-graph safety: each op (forward + backward) runs under
  ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation), is captured in a CUDA
  graph over static padded CSR buffers, and replayed after a different minibatch is copied
  into those buffers: the replay matches an eager run on the new batch.

Every tolerance comes from the table the tests use (``scvi_fast/reference/_accuracy.py``), and
the random batches from their generator (``scvi_fast/reference/_random.py``).

Timings at that shape (recorded in ``benchmarks/results/kernels.csv`` with
``_common.result_row`` / ``record``, and printed), each as a median over ``--repeats``:
``eager`` (CUDA events around each call: launch overhead included) and ``graph`` (one replay of
the op captured in a CUDA graph, the L2 cache flushed before each: what a captured step pays):

* first layer forward+backward: Triton gather, Triton dense, and ``addmm`` of a dense input
  already on the device (cuBLAS; the bar), in fp32, TF32 and bf16 where they apply, and the
  torch sparse reference;
* ZINB (both px_r shapes) and Poisson forward+backward, Triton and the torch reference;
* NB forward and forward+backward with float32 and bfloat16 logits, with the effective
  bandwidth (compulsory bytes / time, see ``reference.nb_bytes_moved``) and its share of the
  device's HBM peak;
* reparam_kl forward+backward.

``--cpu`` runs the same under ``TRITON_INTERPRET=1`` on CPU tensors at a tiny shape (this is
how the script itself is tested without a GPU): no CUDA-graph or sync checks, eager timings
only, nothing recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

# runnable from a checkout without installing the package
_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(_ROOT), str(_ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _common as C  # noqa: E402
from bench_kernels import capture, graph_time_ms, precision, time_ms  # noqa: E402

# (never imports triton) the tolerance table, term magnitudes and random batches of the tests
from scvi_fast import reference  # noqa: E402
from scvi_fast.reference._accuracy import (  # noqa: E402
    error_ratio,
    nb_term_magnitudes,
    poisson_term_magnitudes,
    zinb_term_magnitudes,
)
from scvi_fast.reference._random import CSR, random_csr  # noqa: E402

#: HBM peak of known devices (bytes/s), matched by name; --hbm-peak overrides
HBM_PEAK = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
            ("GH200", 4.0e12), ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12),
            ("A100", 1.56e12), ("L40S", 0.864e12), ("L4", 0.3e12)]


def _parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu", action="store_true", help="interpreter on CPU tensors, tiny shape")
    p.add_argument("--B", type=int, default=None, help="cells (default 1024, 4 with --cpu)")
    p.add_argument("--G", type=int, default=None, help="genes (default 8000, 64 with --cpu)")
    p.add_argument("--H", type=int, default=None, help="hidden units (default 512, 16 with --cpu)")
    p.add_argument("--K", type=int, default=None, help="categories (default 128, 3 with --cpu)")
    p.add_argument("--Z", type=int, default=None, help="latent dims (default 50, 5 with --cpu)")
    p.add_argument("--density", type=float, default=0.1, help="fraction of non-zero counts")
    p.add_argument("--pad", type=float, default=0.1,
                   help="padded CSR capacity past the stored entries, as a fraction of them")
    p.add_argument("--repeats", type=int, default=None, help="runs (default 30, 1 with --cpu)")
    p.add_argument("--hbm-peak", type=float, default=None, help="HBM peak in GB/s")
    p.add_argument("--no-record", action="store_true", help="print the timings only")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = dict(B=4, G=64, H=16, K=3, Z=5, repeats=1)
    full = dict(B=1024, G=8000, H=512, K=128, Z=50, repeats=30)
    for k, v in (tiny if args.cpu else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.cpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    import triton  # only now: TRITON_INTERPRET must be set before triton is first imported

    from scvi_fast.kernels import triton as tk

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    print(f"device: {name}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, git {C.git_sha()}")
    print(f"shape: B={args.B} G={args.G} H={args.H} K={args.K} Z={args.Z} "
          f"density={args.density} padded capacity +{args.pad:.0%}")
    gen = torch.Generator().manual_seed(args.seed)
    ok = True
    ok &= _check_special(tk, device)
    for dtype in (torch.float64, torch.float32):
        inputs = _inputs(gen, args, dtype, device)
        for method in ("gather", "dense"):
            ok &= _check_sparse_linear(tk, inputs, dtype, method)
        ok &= _check_nb(tk, inputs, dtype)
        ok &= _check_zinb_poisson(tk, inputs, dtype)
        ok &= _check_reparam(tk, inputs, dtype)
    inputs = _inputs(gen, args, torch.float32, device)
    for prec in ("tf32", "bf16"):
        ok &= _check_dense_low_precision(tk, inputs, prec, device)
    ok &= _check_nb_bf16(tk, inputs)
    ok &= _check_padding(tk, inputs, args)
    if device.type == "cuda":
        ok &= _check_graph_safety(tk, gen, args, device)
    else:
        print("  [SKIP] no-sync and CUDA-graph checks (CUDA only)")
    rows = _time_all(tk, _inputs(gen, args, torch.float32, device), args, device, name)
    if rows and device.type == "cuda" and not args.no_record:
        path = C.record("kernels.csv", rows, device="cuda")
        print(f"recorded {len(rows)} rows in {path}")
    print("ALL CHECKS PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- inputs


def _counts(gen, B, G, density, dtype=torch.float32):
    """A CSR batch with a cell without counts (row 0) and a gene never observed (gene 0),
    counts up to ~3000."""
    return random_csr(gen, B, G, density, max_count=3000, dtype=dtype, empty_rows=(0,),
                      empty_cols=(0,))


def _inputs(gen, args, dtype, device):
    B, G, H, K, Z = args.B, args.G, args.H, args.K, args.Z
    f64 = dict(generator=gen, dtype=torch.float64)
    indptr, indices, values = csr = _counts(gen, B, G, args.density, dtype)
    log_library = torch.log(csr.dense(G).sum(1).clamp_min(1.0))
    t = dict(
        indptr=indptr, indices=indices, values=values,
        W=torch.randn(G, H, **f64) / G**0.5, b=torch.randn(H, **f64),
        W_cov=torch.randn(K, H, **f64), cov=torch.randint(0, K, (B,), generator=gen),
        gy=torch.randn(B, H, **f64),
        logits=torch.randn(B, G, **f64) * 2, log_library=log_library,
        px_r=torch.randn(G, **f64) * 2, w=torch.randn(B, **f64),
        px_r_rows=torch.randn(B, G, **f64) * 2, pi=torch.randn(B, G, **f64) * 3,
        q_m=torch.randn(B, Z, **f64), q_v_raw=torch.randn(B, Z, **f64) - 1,
        noise=torch.randn(B, Z, **f64), gz=torch.randn(B, Z, **f64), gk=torch.randn(B, **f64),
    )
    out = {}
    for k, v in t.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _padded_csr(t, pad, G):
    """The batch of ``t`` with ``pad`` x nnz poisoned slots past ``indptr[-1]``, int32 arrays."""
    csr = CSR(t["indptr"], t["indices"], t["values"])
    return csr.padded(max(1, int(pad * t["values"].numel())), G).to(index_dtype=torch.int32)


def _grads(out, leaves, upstream):
    return list(torch.autograd.grad(out, leaves, [u.to(o.dtype) for o, u in zip(out, upstream)]))


def _leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ----------------------------------------------------------------------------- checks


def _report(op, dtype, results) -> bool:
    """results: [(what, ratio)] with ratio = error / allowed error."""
    worst = max(r for _, r in results)
    status = "PASS" if worst <= 1.0 else "FAIL"
    detail = ", ".join(f"{w} {r:.2g}" for w, r in results)
    print(f"  [{status}] {op:<24} {str(dtype).replace('torch.', ''):<8} error/allowed: {detail}")
    return worst <= 1.0


def _ratios(op, names, got, truth, low=None, scales=None, precision=None):
    """``[(name, error / allowed)]`` of each output by the tolerance table: ``low`` is torch's
    result at the low precision, ``scales`` the term magnitudes (NB)."""
    n = len(names)
    low, scales = low or [None] * n, scales or [None] * n
    return [(name, error_ratio(op, g, w, precision=precision, low=r, scale=s))
            for name, g, w, r, s in zip(names, got, truth, low, scales)]


def _check_special(tk, device) -> bool:
    x = torch.logspace(-4, 6, 100001, dtype=torch.float64, device=device)
    ok = True
    for dtype in (torch.float64, torch.float32):
        xs = x.to(dtype)
        lg, dg = tk._kernels("_math").special(xs)
        res = [(what, error_ratio(what, got, fn(xs.double())))
               for what, got, fn in (("lgamma", lg, torch.lgamma), ("digamma", dg, torch.digamma))]
        ok &= _report("lgamma/digamma", dtype, res)
    return ok


def _sparse_linear_run(fn, t, dtype_to=None, csr=None, **kw):
    conv = (lambda v: v.to(dtype_to)) if dtype_to is not None else (lambda v: v)
    W, b, W_cov = _leaf(conv(t["W"]), conv(t["b"]), conv(t["W_cov"]))
    indptr, indices, values = csr or (t["indptr"], t["indices"], t["values"])
    y = fn(indptr, indices, conv(values), W, b, t["cov"], W_cov, "log1p", **kw)
    return [y.detach()] + _grads([y], [W, b, W_cov], [conv(t["gy"])])


def _check_sparse_linear(tk, t, dtype, method) -> bool:
    got = _sparse_linear_run(tk.sparse_linear, t, method=method)
    truth = _sparse_linear_run(reference.sparse_linear, t, torch.float64)
    low = _sparse_linear_run(reference.sparse_linear, t) if dtype == torch.float32 else None
    res = _ratios("sparse_linear", ["y", "dW", "db", "dW_cov"], got, truth, low)
    return _report(f"sparse_linear {method}", dtype, res)


def _check_dense_low_precision(tk, t, prec, device) -> bool:
    """The dense method in TF32 / bf16 against the float64 truth, judged against the error of
    torch's own GEMM on the dense input at the same precision (the layer an nn.Linear runs)."""
    truth = _sparse_linear_run(reference.sparse_linear, t, torch.float64)
    with precision(prec, device):
        got = _sparse_linear_run(tk.sparse_linear, t, method="dense")
        torch_lp = _sparse_linear_run(reference.sparse_linear, t, method="dense")
    res = _ratios("sparse_linear", ["y", "dW", "db", "dW_cov"], got, truth, torch_lp,
                  precision={"tf32": "tf32", "bf16": "autocast-bf16"}[prec])
    return _report("sparse_linear dense", prec, res)


NB_NAMES = ["loglik", "dlogits", "dlog_library", "dpx_r"]


def _nb_run(fn, t, dtype_to=None, logits_dtype=None, csr=None):
    conv = (lambda v: v.to(dtype_to)) if dtype_to is not None else (lambda v: v)
    logits = conv(t["logits"]) if logits_dtype is None else t["logits"].to(logits_dtype)
    z, l, r = _leaf(logits, conv(t["log_library"]), conv(t["px_r"]))
    indptr, indices, values = csr or (t["indptr"], t["indices"], t["values"])
    ll = fn(z, l, r, (indptr, indices, conv(values)), 1e-8)
    return [ll.detach()] + _grads([ll], [z, l, r], [conv(t["w"])])


def _nb_scales(t, logits=None):
    return nb_term_magnitudes(
        t["logits"] if logits is None else logits, t["log_library"], t["px_r"],
        (t["indptr"], t["indices"], t["values"]), t["w"],
    )


def _check_nb(tk, t, dtype) -> bool:
    got = _nb_run(tk.nb_softmax_loglik, t)
    truth = _nb_run(reference.nb_softmax_loglik, t, torch.float64)
    res = _ratios("nb_softmax_loglik", NB_NAMES, got, truth, scales=_nb_scales(t))
    return _report("nb_softmax_loglik", dtype, res)


def _check_nb_bf16(tk, t) -> bool:
    """bfloat16 logits read directly: float32-accurate results for those (rounded) logits; the
    logits' gradient in bf16 within one rounding."""
    got = _nb_run(tk.nb_softmax_loglik, t, logits_dtype=torch.bfloat16)
    rounded = dict(t, logits=t["logits"].to(torch.bfloat16).double())
    truth = _nb_run(reference.nb_softmax_loglik, rounded, torch.float64)
    # the bf16 gradient of the logits takes the table's "bfloat16" entry (one rounding)
    res = _ratios("nb_softmax_loglik", NB_NAMES, got, truth,
                  scales=_nb_scales(t, rounded["logits"]))
    ok = got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    return _report("nb_softmax_loglik bf16 z", torch.bfloat16, res) and ok


def _check_zinb_poisson(tk, t, dtype) -> bool:
    """ZINB with both px_r shapes and Poisson: value and every gradient against float64."""
    csr = (t["indptr"], t["indices"], t["values"])
    csr64 = (t["indptr"], t["indices"], t["values"].double())
    ok = True
    for r in ("px_r", "px_r_rows"):
        leaves = (t["logits"], t["log_library"], t[r], t["pi"])
        got = _run_all(tk.zinb_softmax_loglik, leaves, csr, t["w"])
        truth = _run_all(reference.zinb_softmax_loglik, [v.double() for v in leaves], csr64,
                         t["w"].double())
        scales = zinb_term_magnitudes(*leaves, csr, t["w"])
        res = _ratios("zinb_softmax_loglik", NB_NAMES + ["ddropout"], got, truth, scales=scales)
        ok &= _report(f"zinb_softmax_loglik {r}", dtype, res)
    leaves = (t["logits"], t["log_library"])
    got = _run_all(tk.poisson_softmax_loglik, leaves, csr, t["w"])
    truth = _run_all(reference.poisson_softmax_loglik, [v.double() for v in leaves], csr64,
                     t["w"].double())
    res = _ratios("poisson_softmax_loglik", NB_NAMES[:3], got, truth,
                  scales=poisson_term_magnitudes(*leaves, csr, t["w"]))
    return _report("poisson_softmax_loglik", dtype, res) and ok


def _run_all(fn, leaves, csr, w):
    """Value and the gradients to every leaf of ``fn(*leaves, csr)`` under upstream ``w``."""
    leaves = _leaf(*leaves)
    ll = fn(*leaves, csr)
    return [ll.detach()] + _grads([ll], leaves, [w])


def _reparam_run(fn, t, dtype_to=None):
    conv = (lambda v: v.to(dtype_to)) if dtype_to is not None else (lambda v: v)
    m, r, e = _leaf(conv(t["q_m"]), conv(t["q_v_raw"]), conv(t["noise"]))
    z, kl = fn(m, r, e)
    return [z.detach(), kl.detach()] + _grads([z, kl], [m, r, e], [conv(t["gz"]), conv(t["gk"])])


def _check_reparam(tk, t, dtype) -> bool:
    got = _reparam_run(tk.reparam_kl, t)
    truth = _reparam_run(reference.reparam_kl, t, torch.float64)
    low = _reparam_run(reference.reparam_kl, t) if dtype == torch.float32 else None
    res = _ratios("reparam_kl", ["z", "kl", "dq_m", "dq_v_raw", "deps"], got, truth, low)
    return _report("reparam_kl", dtype, res)


def _check_padding(tk, t, args) -> bool:
    """A poisoned padded tail (int32 arrays) changes no output or gradient: bit for bit, except
    the NB px_r gradient whose per-gene atomic adds may run in another order on a GPU."""
    padded = _padded_csr(t, args.pad, args.G)
    res = []
    for method in ("gather", "dense"):
        a = _sparse_linear_run(tk.sparse_linear, t, method=method)
        b = _sparse_linear_run(tk.sparse_linear, t, csr=padded, method=method)
        res.append((f"sparse_linear {method}", _unequal(a, b)))
    a = _nb_run(tk.nb_softmax_loglik, t)
    b = _nb_run(tk.nb_softmax_loglik, t, csr=padded)
    res.append(("nb", max(_unequal(a[:3], b[:3]), error_ratio("nb_px_r_order", b[3], a[3]))))
    return _report("padded CSR tail", "int32", res)


def _unequal(xs, ys) -> float:
    """0 when every pair is bit for bit equal, else inf (a failed check)."""
    return 0.0 if all(torch.equal(x, y) for x, y in zip(xs, ys)) else float("inf")


def _check_graph_safety(tk, gen, args, device) -> bool:
    """No host sync; captured once over static padded buffers, each op replays right on a new
    minibatch copied into them."""
    B, G = args.B, args.G
    cap = int(B * G * min(1.0, 1.5 * args.density)) + 16  # room for both batches below
    static = dict(indptr=torch.zeros(B + 1, dtype=torch.int32, device=device),
                  indices=torch.full((cap,), -1, dtype=torch.int32, device=device),
                  values=torch.full((cap,), float("nan"), device=device))

    def load(batch):  # what the training step's input copy does: in place, no sync
        n = batch.values.numel()
        static["indptr"].copy_(batch.indptr)
        static["indices"][:n].copy_(batch.indices)
        static["values"][:n].copy_(batch.values)
        static["indices"][n:].fill_(-1)
        static["values"][n:].fill_(float("nan"))

    f64 = dict(generator=gen)
    W = (torch.randn(G, args.H, **f64) / G**0.5).to(device).requires_grad_()
    b = torch.randn(args.H, **f64).to(device).requires_grad_()
    W_cov = torch.randn(args.K, args.H, **f64).to(device).requires_grad_()
    cov = torch.randint(0, args.K, (B,), **f64).to(device)
    gy = torch.randn(B, args.H, **f64).to(device)
    logits = (torch.randn(B, G, **f64) * 2).to(device).requires_grad_()
    lib = torch.randn(B, **f64).add(7).to(device).requires_grad_()
    px_r = torch.randn(G, **f64).to(device).requires_grad_()
    w = torch.randn(B, **f64).to(device)
    pi = (torch.randn(B, G, **f64) * 3).to(device).requires_grad_()
    px_rows = torch.randn(B, G, **f64).to(device).requires_grad_()
    q_m, q_v = (torch.randn(B, args.Z, **f64).to(device).requires_grad_() for _ in range(2))
    noise = torch.randn(B, args.Z, **f64).to(device)
    gz, gk = torch.randn(B, args.Z, **f64).to(device), torch.randn(B, **f64).to(device)
    csr = (static["indptr"], static["indices"], static["values"])
    ops = {
        "sparse_linear gather": lambda: _step(
            tk.sparse_linear(*csr, W, b, cov, W_cov, "log1p", method="gather"), [W, b, W_cov], gy),
        "sparse_linear dense": lambda: _step(
            tk.sparse_linear(*csr, W, b, cov, W_cov, "log1p", method="dense"), [W, b, W_cov], gy),
        "nb_softmax_loglik": lambda: _step(
            tk.nb_softmax_loglik(logits, lib, px_r, csr), [logits, lib, px_r], w),
        "zinb_softmax_loglik": lambda: _step(
            tk.zinb_softmax_loglik(logits, lib, px_r, pi, csr), [logits, lib, px_r, pi], w),
        "zinb (B, G) px_r": lambda: _step(
            tk.zinb_softmax_loglik(logits, lib, px_rows, pi, csr), [logits, lib, px_rows, pi], w),
        "poisson_softmax_loglik": lambda: _step(
            tk.poisson_softmax_loglik(logits, lib, csr), [logits, lib], w),
        "reparam_kl": lambda: _step(tk.reparam_kl(q_m, q_v, noise), [q_m, q_v], (gz, gk)),
    }
    batches = [_counts(gen, B, G, args.density * s) for s in (1.0, 1.25)]
    ok = True
    for name, fn in ops.items():
        load(batches[0])
        fn()  # warm-up: compile, choose configurations
        torch.cuda.synchronize()
        err = ""
        try:
            torch.cuda.set_sync_debug_mode("error")
            fn()
        except RuntimeError as e:
            err = f"synchronises with the host: {str(e).splitlines()[0][:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if not err:
            graph, outs = capture(fn, device, warmup=1)
            load(batches[1])
            graph.replay()
            eager = fn()
            for i, (g, e) in enumerate(zip(outs, eager)):
                # per-gene sums by atomics or index_add_: their order may vary
                exact = not (name in ("nb_softmax_loglik", "zinb_softmax_loglik") and i == 3)
                same = torch.equal(g, e) if exact else error_ratio("nb_px_r_order", g, e) <= 1
                if not same:
                    err = f"graph replay differs from eager on the new batch (output {i})"
            del graph
        print(f"  [{'FAIL' if err else 'PASS'}] {name:<24} no sync, CUDA graph replay on a "
              f"new batch{': ' + err if err else ''}")
        ok &= not err
    return ok


def _step(out, leaves, upstream):
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream if isinstance(upstream, tuple) else (upstream,)
    grads = torch.autograd.grad(outs, leaves, ups)
    return [o.detach() for o in outs] + list(grads)


# ----------------------------------------------------------------------------- timing


def _hbm_peak(args, name) -> float | None:
    if args.hbm_peak:
        return args.hbm_peak * 1e9
    for key, peak in HBM_PEAK:
        if key in name:
            return peak
    return None


def _time_all(tk, t, args, device, device_name) -> list[dict]:
    rep = args.repeats
    warm = 1 if device.type == "cpu" else 3
    shape = dict(B=args.B, G=args.G, H=args.H, density=args.density)
    rows = []
    peak = _hbm_peak(args, device_name)
    print(f"timing (ms: median [p20, p80] of {rep} runs; eager = events around each call, "
          f"graph = one CUDA-graph replay, L2 flushed)")

    def timed(what, provider, impl, name, prec, fn, config=None, op_shape=None):
        kinds = [("eager", lambda: time_ms(fn, device, rep, warm))]
        if device.type == "cuda":
            kinds.append(("graph", lambda: graph_time_ms(fn, device, rep)))
        meds = {}
        for timing, run in kinds:
            ts = run()
            row = C.result_row(f"kernel:{what}", provider, "time", "ms", ts, impl=impl,
                               mode=f"{name},{prec},{timing}", shape=op_shape or shape,
                               config=config)
            rows.append(row)
            meds[timing] = (row["median"], ts)
            print(f"  {what:<18} {impl:<16} {name:<8} {prec:<5} {timing:<6}"
                  f"{row['median']:9.4f} [{row['p20']:.4f}, {row['p80']:.4f}]", flush=True)
        return meds

    padded = _padded_csr(t, args.pad, args.G)
    cap = padded[1].numel()

    # first layer: Triton gather and dense, against addmm of a dense input and torch sparse
    W, b, W_cov = _leaf(t["W"], t["b"], t["W_cov"])

    def sl(fn, method=None, csr=padded):
        kw = {} if method is None else {"method": method}

        def run():
            y = fn(*csr, W, b, t["cov"], W_cov, "log1p", **kw)
            torch.autograd.grad(y, [W, b, W_cov], t["gy"].to(y.dtype))
        return run

    dense_x = torch.log1p(reference.csr_to_dense(t["indptr"], t["indices"], t["values"], args.G))
    W_lin = t["W"].t().contiguous().requires_grad_(True)  # nn.Linear layout (H, G)

    def dense_addmm():
        y = torch.addmm(b, dense_x, W_lin.t())
        torch.autograd.grad(y, [W_lin, b], t["gy"].to(y.dtype))

    cfg_pad = dict(capacity=cap, nnz=t["values"].numel())
    for prec in ("fp32", "tf32", "bf16"):
        with precision(prec, device):
            if prec == "fp32":
                timed("sparse_linear", "scvi_fast", "triton:gather", "fwd+bwd", prec,
                      sl(tk.sparse_linear, "gather"), dict(cfg_pad, method="gather"))
            timed("sparse_linear", "scvi_fast", "triton:dense", "fwd+bwd", prec,
                  sl(tk.sparse_linear, "dense"), dict(cfg_pad, method="dense"))
            timed("sparse_linear", "torch", "cublas:addmm", "fwd+bwd", prec, dense_addmm,
                  dict(baseline="addmm of a dense input already on the device"))
            if prec == "fp32":
                timed("sparse_linear", "torch", "torch:gather", "fwd+bwd", prec,
                      sl(reference.sparse_linear, csr=(t["indptr"], t["indices"], t["values"])),
                      dict(method="gather", baseline="torch.sparse.mm"))

    # NB: forward and forward+backward, float32 and bfloat16 logits
    nnz = t["values"].numel()
    for prec, zdtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        z, l, r = _leaf(t["logits"].to(zdtype), t["log_library"], t["px_r"])

        def nb_fwd(fn, z=z):
            with torch.no_grad():
                fn(z, l, r, padded, 1e-8)

        def nb_fwd_bwd(fn, z=z):
            ll = fn(z, l, r, padded, 1e-8)
            torch.autograd.grad(ll, [z, l, r], t["w"])

        fwd_bytes, bwd_bytes = reference.nb_bytes_moved(args.B, args.G, nnz, z.element_size(),
                                                        4, 4, 4)
        meds = {}
        for name, fn in (("fwd", nb_fwd), ("fwd+bwd", nb_fwd_bwd)):
            meds[name] = timed("nb_softmax_loglik", "scvi_fast", "triton", name, prec,
                               lambda fn=fn: fn(tk.nb_softmax_loglik), cfg_pad)
            nbytes = fwd_bytes if name == "fwd" else fwd_bytes + bwd_bytes
            for timing, (med, ts) in meds[name].items():
                gbs = [nbytes / x / 1e6 for x in ts]
                mode = f"{name},{prec},{timing}"
                rows.append(C.result_row("kernel:nb_softmax_loglik", "scvi_fast", "bandwidth",
                                         "GB/s", gbs, impl="triton", mode=mode, shape=shape,
                                         config=dict(cfg_pad, bytes=nbytes, counted="compulsory")))
                if peak:
                    rows.append(C.result_row("kernel:nb_softmax_loglik", "scvi_fast",
                                             "hbm_peak_fraction", "%",
                                             [100 * g * 1e9 / peak for g in gbs], impl="triton",
                                             mode=mode, shape=shape,
                                             config=dict(peak_gb_s=peak / 1e9)))
        best = "graph" if device.type == "cuda" else "eager"
        f_ms, fb_ms = meds["fwd"][best][0], meds["fwd+bwd"][best][0]
        share = (lambda gbs: f" = {100 * gbs * 1e9 / peak:.0f}% of HBM peak") if peak else (
            lambda gbs: "")
        gf, gfb = fwd_bytes / f_ms / 1e6, (fwd_bytes + bwd_bytes) / fb_ms / 1e6
        print(f"  NB achieved bandwidth ({prec} logits, {best}): fwd {gf:.1f} GB/s{share(gf)} "
              f"({fwd_bytes / 1e6:.1f} MB), fwd+bwd {gfb:.1f} GB/s{share(gfb)} "
              f"({(fwd_bytes + bwd_bytes) / 1e6:.1f} MB)")
    zr, lr_, rr = _leaf(t["logits"], t["log_library"], t["px_r"])

    def nb_ref():
        ll = reference.nb_softmax_loglik(zr, lr_, rr, (t["indptr"], t["indices"], t["values"]))
        torch.autograd.grad(ll, [zr, lr_, rr], t["w"])

    timed("nb_softmax_loglik", "torch", "torch", "fwd+bwd", "fp32", nb_ref)

    # ZINB (px_r (G,) and (B, G)) and Poisson forward+backward, Triton against the reference
    csr = (t["indptr"], t["indices"], t["values"])
    likelihoods = [
        ("zinb_softmax_loglik", "px_r", (t["logits"], t["log_library"], t["px_r"], t["pi"])),
        ("zinb_softmax_loglik", "px_r_rows",
         (t["logits"], t["log_library"], t["px_r_rows"], t["pi"])),
        ("poisson_softmax_loglik", "", (t["logits"], t["log_library"])),
    ]
    for op, variant, inputs in likelihoods:
        leaves = _leaf(*inputs)
        for provider, impl, fn, batch in (("scvi_fast", "triton", getattr(tk, op), padded),
                                          ("torch", "torch", getattr(reference, op), csr)):
            def run(fn=fn, batch=batch, leaves=leaves):
                ll = fn(*leaves, batch)
                torch.autograd.grad(ll, leaves, t["w"])

            timed(op, provider, impl, "fwd+bwd", "fp32", run,
                  dict(cfg_pad, px_r=variant) if variant else cfg_pad)

    # reparam_kl
    m, rv, e = _leaf(t["q_m"], t["q_v_raw"], t["noise"])
    rk_shape = dict(B=args.B, Z=args.Z)

    def rk(fn):
        def run():
            zz, kl = fn(m, rv, e)
            torch.autograd.grad([zz, kl], [m, rv], [t["gz"], t["gk"]])
        return run

    timed("reparam_kl", "scvi_fast", "triton", "fwd+bwd", "fp32", rk(tk.reparam_kl),
          op_shape=rk_shape)
    timed("reparam_kl", "torch", "torch", "fwd+bwd", "fp32", rk(reference.reparam_kl),
          op_shape=rk_shape)
    return rows


if __name__ == "__main__":
    sys.exit(main())
