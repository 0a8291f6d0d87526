#!/usr/bin/env python
"""Compile every Triton kernel on a CUDA device, check it against the references, time it.

On a GPU machine (default: the Census shape B=1024, G=8000, H=512, 10% non-zeros)::

    python benchmarks/gpu_check_kernels.py

* checks lgamma / digamma (plain Triton) against torch over 1e-4 .. 1e6;
* checks each op, value and every gradient with a non-unit upstream gradient: float64 against
  the float64 reference, float32 against the float64 truth (within a small factor of torch's
  own float32 error; for the NB op within k * the sum of |terms|, as in the tests);
* times forward and forward+backward (median and spread of repeated runs, CUDA events) next to
  the torch reference, and prints the NB op's achieved GB/s (bytes moved / time).

Exit status 1 when a check fails. ``--cpu`` runs the same under ``TRITON_INTERPRET=1`` on CPU
tensors at a tiny shape (this is how the script itself is tested without a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

# runnable from a checkout without installing the package
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from scvi_fast import reference  # noqa: E402  (torch and the references never import triton)

# checks: (op, what) -> max error ratio; ratio <= 1 passes
FACTOR32 = 4.0  # float32: error <= FACTOR32 * torch's float32 error + floor
FLOOR32 = 1e-6  # ... relative to max(1, max |truth|)
TOL64 = 1e-12  # float64 sparse_linear / reparam_kl: rtol = atol
NB_K = {"float64": 5e-13, "float32": 2e-6}  # NB: error <= k * sum of |terms| (term_magnitudes)
SPECIAL_RTOL = {"float64": (5e-14, 5e-15), "float32": (1e-5, 2e-6)}  # (lgamma, digamma)


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
    p.add_argument("--repeats", type=int, default=None, help="runs (default 50, 1 with --cpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = dict(B=4, G=64, H=16, K=3, Z=5, repeats=1)
    full = dict(B=1024, G=8000, H=512, K=128, Z=50, repeats=50)
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
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"shape: B={args.B} G={args.G} H={args.H} K={args.K} Z={args.Z} density={args.density}")
    gen = torch.Generator().manual_seed(args.seed)
    ok = True
    ok &= _check_special(tk, device)
    for dtype in (torch.float64, torch.float32):
        inputs = _inputs(gen, args, dtype, device)
        ok &= _check_sparse_linear(tk, inputs, dtype)
        ok &= _check_nb(tk, inputs, dtype)
        ok &= _check_reparam(tk, inputs, dtype)
    _time_all(tk, _inputs(gen, args, torch.float32, device), args, device)
    print("ALL CHECKS PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- inputs


def _inputs(gen, args, dtype, device):
    B, G, H, K, Z = args.B, args.G, args.H, args.K, args.Z
    f64 = dict(generator=gen, dtype=torch.float64)
    mask = torch.rand(B, G, generator=gen) < args.density
    mask[0] = False  # a cell without counts
    mask[:, 0] = False  # a gene never observed
    counts = torch.floor(torch.exp(torch.rand(B, G, generator=gen) * 8.0)).clamp_min(1)  # 1..~3000
    dense = torch.where(mask, counts, torch.zeros(()))
    csr = dense.to_sparse_csr()
    indptr, indices = csr.crow_indices(), csr.col_indices()
    values = csr.values().to(dtype)
    log_library = torch.log(dense.sum(1).double().clamp_min(1.0))
    t = dict(
        indptr=indptr, indices=indices, values=values,
        W=torch.randn(G, H, **f64) / G**0.5, b=torch.randn(H, **f64),
        W_cov=torch.randn(K, H, **f64), cov=torch.randint(0, K, (B,), generator=gen),
        gy=torch.randn(B, H, **f64),
        logits=torch.randn(B, G, **f64) * 2, log_library=log_library,
        px_r=torch.randn(G, **f64) * 2, w=torch.randn(B, **f64),
        q_m=torch.randn(B, Z, **f64), q_v_raw=torch.randn(B, Z, **f64) - 1,
        noise=torch.randn(B, Z, **f64), gz=torch.randn(B, Z, **f64), gk=torch.randn(B, **f64),
    )
    out = {}
    for k, v in t.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _grads(out, leaves, upstream):
    loss = sum((o * u).sum() for o, u in zip(out, upstream))
    return [g for g in torch.autograd.grad(loss, leaves)]


def _leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ----------------------------------------------------------------------------- checks


def _report(op, dtype, results) -> bool:
    """results: [(what, ratio)] with ratio = error / allowed error."""
    worst = max(r for _, r in results)
    status = "PASS" if worst <= 1.0 else "FAIL"
    detail = ", ".join(f"{w} {r:.2g}" for w, r in results)
    print(f"  [{status}] {op:<18} {str(dtype).replace('torch.', ''):<8} error/allowed: {detail}")
    return worst <= 1.0


def _ratio64(got, want):
    err = (got - want).abs()
    return (err / (TOL64 + TOL64 * want.abs())).max().item() if err.numel() else 0.0


def _ratio32(got, torch32, truth):
    if not truth.numel():
        return 0.0
    err = (got.double() - truth).abs().max().item()
    ref_err = (torch32.double() - truth).abs().max().item()
    return err / (FACTOR32 * ref_err + FLOOR32 * max(1.0, truth.abs().max().item()))


def _check_special(tk, device) -> bool:
    x = torch.logspace(-4, 6, 100001, dtype=torch.float64, device=device)
    ok = True
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        xs = x.to(dtype)
        lg, dg = tk._kernels("_math").special(xs)
        res = []
        for what, got, fn, rtol in (("lgamma", lg, torch.lgamma, SPECIAL_RTOL[name][0]),
                                    ("digamma", dg, torch.digamma, SPECIAL_RTOL[name][1])):
            truth = fn(xs.double())
            rel = ((got.double() - truth).abs() / truth.abs().clamp_min(1.0)).max().item()
            res.append((what, rel / rtol))
        ok &= _report("lgamma/digamma", dtype, res)
    return ok


def _sparse_linear_run(fn, t, dtype_to=None):
    conv = (lambda v: v.to(dtype_to)) if dtype_to is not None else (lambda v: v)
    W, b, W_cov = _leaf(conv(t["W"]), conv(t["b"]), conv(t["W_cov"]))
    y = fn(t["indptr"], t["indices"], conv(t["values"]), W, b, t["cov"], W_cov, "log1p")
    return [y.detach()] + _grads([y], [W, b, W_cov], [conv(t["gy"])])


def _check_sparse_linear(tk, t, dtype) -> bool:
    got = _sparse_linear_run(tk.sparse_linear, t)
    names = ["y", "dW", "db", "dW_cov"]
    if dtype == torch.float64:
        want = _sparse_linear_run(reference.sparse_linear, t)
        res = [(n, _ratio64(g, w)) for n, g, w in zip(names, got, want)]
    else:
        truth = _sparse_linear_run(reference.sparse_linear, t, torch.float64)
        t32 = _sparse_linear_run(reference.sparse_linear, t)
        res = [(n, _ratio32(g, a, w)) for n, g, a, w in zip(names, got, t32, truth)]
    return _report("sparse_linear", dtype, res)


def _nb_run(fn, t, dtype_to=None):
    conv = (lambda v: v.to(dtype_to)) if dtype_to is not None else (lambda v: v)
    z, l, r = _leaf(conv(t["logits"]), conv(t["log_library"]), conv(t["px_r"]))
    ll = fn(z, l, r, (t["indptr"], t["indices"], conv(t["values"])), 1e-8)
    return [ll.detach()] + _grads([ll], [z, l, r], [conv(t["w"])])


def _check_nb(tk, t, dtype) -> bool:
    got = _nb_run(tk.nb_softmax_loglik, t)
    truth = _nb_run(reference.nb_softmax_loglik, t, torch.float64)
    k = NB_K["float64" if dtype == torch.float64 else "float32"]
    res = []
    scales = tk._kernels("_nb_loglik").term_magnitudes(
        t["logits"], t["log_library"], t["px_r"], (t["indptr"], t["indices"], t["values"]), t["w"]
    )
    names = ["loglik", "dlogits", "dlog_library", "dpx_r"]
    for n, g, w, s in zip(names, got, truth, scales):
        res.append((n, ((g.double() - w).abs() / (k * s + 1e-300)).max().item()))
    return _report("nb_softmax_loglik", dtype, res)


def _reparam_run(fn, t, dtype_to=None):
    conv = (lambda v: v.to(dtype_to)) if dtype_to is not None else (lambda v: v)
    m, r, e = _leaf(conv(t["q_m"]), conv(t["q_v_raw"]), conv(t["noise"]))
    z, kl = fn(m, r, e)
    return [z.detach(), kl.detach()] + _grads([z, kl], [m, r, e], [conv(t["gz"]), conv(t["gk"])])


def _check_reparam(tk, t, dtype) -> bool:
    got = _reparam_run(tk.reparam_kl, t)
    names = ["z", "kl", "dq_m", "dq_v_raw", "deps"]
    if dtype == torch.float64:
        want = _reparam_run(reference.reparam_kl, t)
        res = [(n, _ratio64(g, w)) for n, g, w in zip(names, got, want)]
    else:
        truth = _reparam_run(reference.reparam_kl, t, torch.float64)
        t32 = _reparam_run(reference.reparam_kl, t)
        res = [(n, _ratio32(g, a, w)) for n, g, a, w in zip(names, got, t32, truth)]
    return _report("reparam_kl", dtype, res)


# ----------------------------------------------------------------------------- timing


def _timeit(fn, repeats, device):
    """Median and (min, max) in ms over ``repeats`` runs after warm-up."""
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def _nb_bytes(tk, t):
    """Bytes moved by the NB kernels, as the package counts them."""
    B, G = t["logits"].shape
    return tk.nb_bytes_moved(
        B, G, t["indices"].numel(), t["logits"].element_size(),
        t["indices"].element_size(), t["values"].element_size(),
    )


def _time_all(tk, t, args, device):
    rep = args.repeats
    print(f"timing (float32, ms: median [min, max] of {rep} runs)")

    def row(name, fn):
        med, lo, hi = _timeit(fn, rep, device)
        print(f"  {name:<44} {med:9.3f} [{lo:.3f}, {hi:.3f}]")
        return med

    # NB: forward, forward+backward, GB/s
    z, l, r = _leaf(t["logits"], t["log_library"], t["px_r"])
    X = (t["indptr"], t["indices"], t["values"])

    def nb_fwd(fn):
        with torch.no_grad():
            fn(z, l, r, X, 1e-8)

    def nb_fwd_bwd(fn):
        ll = fn(z, l, r, X, 1e-8)
        torch.autograd.grad((ll * t["w"]).sum(), [z, r])

    fwd_bytes, bwd_bytes = _nb_bytes(tk, t)
    ms_f = row("nb_softmax_loglik fwd        triton", lambda: nb_fwd(tk.nb_softmax_loglik))
    ms_fr = row("nb_softmax_loglik fwd        torch", lambda: nb_fwd(reference.nb_softmax_loglik))
    ms_fb = row("nb_softmax_loglik fwd+bwd    triton", lambda: nb_fwd_bwd(tk.nb_softmax_loglik))
    ms_fbr = row(
        "nb_softmax_loglik fwd+bwd    torch", lambda: nb_fwd_bwd(reference.nb_softmax_loglik)
    )
    print(
        f"  NB achieved bandwidth: fwd {fwd_bytes / ms_f / 1e6:.1f} GB/s "
        f"({fwd_bytes / 1e6:.1f} MB), fwd+bwd {(fwd_bytes + bwd_bytes) / ms_fb / 1e6:.1f} GB/s "
        f"({(fwd_bytes + bwd_bytes) / 1e6:.1f} MB); speed-up vs torch: fwd {ms_fr / ms_f:.1f}x, "
        f"fwd+bwd {ms_fbr / ms_fb:.1f}x"
    )

    # sparse_linear: against the reference (torch.sparse.mm) and the dense addmm of the layer
    W, b, W_cov = _leaf(t["W"], t["b"], t["W_cov"])

    def sl(fn):
        y = fn(t["indptr"], t["indices"], t["values"], W, b, t["cov"], W_cov, "log1p")
        torch.autograd.grad((y * t["gy"]).sum(), [W, b, W_cov])

    dense_x = torch.log1p(
        reference.csr_to_dense(t["indptr"], t["indices"], t["values"], t["W"].shape[0])
    )
    W_lin = t["W"].t().contiguous().requires_grad_(True)  # nn.Linear layout (H, G)

    def dense_addmm():
        y = torch.addmm(b, dense_x, W_lin.t())
        torch.autograd.grad((y * t["gy"]).sum(), [W_lin])

    row("sparse_linear fwd+bwd        triton", lambda: sl(tk.sparse_linear))
    row("sparse_linear fwd+bwd        torch sparse", lambda: sl(reference.sparse_linear))
    row("dense addmm of the layer fwd+bwd", dense_addmm)

    m, rr, e = _leaf(t["q_m"], t["q_v_raw"], t["noise"])

    def rk(fn):
        zz, kl = fn(m, rr, e)
        torch.autograd.grad((zz * t["gz"]).sum() + (kl * t["gk"]).sum(), [m, rr])

    row("reparam_kl fwd+bwd           triton", lambda: rk(tk.reparam_kl))
    row("reparam_kl fwd+bwd           torch", lambda: rk(reference.reparam_kl))


if __name__ == "__main__":
    sys.exit(main())
