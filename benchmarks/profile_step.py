"""Where a training step and an embedding batch spend their time: a ``torch.profiler`` harness.

Builds the Census-preset model (512/50/2; ``--n-hidden`` etc. override it) on a synthetic CSR
store and profiles it through the public API only (``SCVI.train`` and
``get_latent_representation``), so it works whatever the training loop does inside (eager
steps or a CUDA graph). Per-step figures are marginal: the same call is profiled twice, with
``1`` and ``1 + --epochs`` epochs (``--batches`` and twice that many embedding batches), and
the difference is divided by the extra steps. Set-up, graph capture and the first-call costs
cancel; the end-of-epoch work (one metrics read per epoch) is spread over the epoch's steps.

On CUDA it reports, per training step and per embedding batch:

* GPU time per op (top ops) and per CUDA kernel;
* GPU busy fraction: time covered by kernels, copies and memsets / wall time;
* kernels executed, launch calls made (``cudaLaunchKernel``, ``cuLaunchKernel``, ``cudaGraphLaunch``,
  async copies and memsets);
* host synchronisations: ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` /
  ``cudaEventSynchronize`` calls, device-to-host copies, and the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")`` with the source lines that raised them.

On the CPU (``--device cpu``) it counts the aten ops per step (all of them, and the computing
ones, each of which would launch at least one kernel on a GPU), lists them, and flags those that would
synchronise a GPU with the host (``aten::item`` / ``_local_scalar_dense``, ``nonzero``,
``masked_select``, ``unique``...), so that launches and syncs can be cut without a GPU.

The tables go to ``<out>/profile_<device>.txt``; the summary numbers to ``profile.csv`` (long
schema, ``what`` = ``profile:train_step`` / ``profile:embed_batch``).

    python benchmarks/profile_step.py --device cpu --out /tmp/prof        # about a minute
    python benchmarks/profile_step.py --device cuda --out /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
import warnings
from pathlib import Path

import _common as C
from bench_train import CUDA_GRAPH, PRECISION_LABEL, train_kwargs

#: aten ops that make the host wait for the GPU (their result decides what the host does next)
SYNC_OPS = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero",
    "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2",
    "aten::unique_consecutive", "aten::unique_dim", "aten::equal", "aten::allclose",
    "aten::repeat_interleave", "aten::bincount", "aten::histc", "aten::_assert_async",
    "aten::tolist", "aten::cpu", "aten::nonzero_numpy", "aten::masked_scatter_",
    "aten::index_put_", "aten::_index_put_impl_",
})
#: aten ops that only allocate, reinterpret or look at metadata: no kernel of their own
NO_KERNEL = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view",
    "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::detach", "aten::alias",
    "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::lift", "aten::t",
    "aten::transpose", "aten::permute", "aten::expand", "aten::expand_as", "aten::unsqueeze",
    "aten::squeeze", "aten::select", "aten::slice", "aten::narrow", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::diagonal", "aten::to",
    "aten::contiguous", "aten::result_type", "aten::_has_compatible_shallow_copy_type",
    "aten::set_", "aten::numpy_T", "aten::is_same_size", "aten::size", "aten::stride",
    "aten::_nested_tensor_from_mask_left_aligned", "aten::broadcast_tensors", "aten::flatten",
    "aten::view_as", "aten::unflatten", "aten::movedim", "aten::swapaxes", "aten::_to_copy",
})
#: host-side CUDA API calls that block until the device is done (by name prefix; the plain
#: ``cudaMemcpy`` waits too)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cudaMemcpy2D")
#: host-side CUDA API calls that put work on a stream (by name prefix: runtime and driver API,
#: Triton launches through ``cuLaunchKernel(Ex)``)
LAUNCH_CALLS = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch", "cudaMemcpyAsync",
                "cudaMemsetAsync", "cuMemcpyAsync", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync",
                "cuMemsetD")


def is_launch(name: str) -> bool:
    return name.startswith(LAUNCH_CALLS)


def is_sync(name: str) -> bool:
    return name.startswith(SYNC_CALLS) or name == "cudaMemcpy"


def _is_api_call(name: str) -> bool:
    """A CUDA runtime (``cuda*``) or driver (``cuX*``) API call rather than an op."""
    return name.startswith("cuda") or (name.startswith("cu") and name[2:3].isupper())


# ------------------------------------------------------------------------ one profiled call
class Profiled:
    """The events of one profiled call, reduced to what the report needs."""

    def __init__(self, fn, cuda: bool):
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        caught: list[warnings.WarningMessage] = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught, profile(activities=acts) as prof:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                self.wall_s = time.perf_counter() - t0
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        self.sync_warnings = collections.Counter(
            f"{Path(w.filename).name}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message).lower())
        self.table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        self.table_gpu = (prof.key_averages().table(sort_by="self_device_time_total",
                                                    row_limit=40) if cuda else "")
        events = prof.events()
        gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        self.kernels = collections.Counter()
        self.kernel_us = collections.Counter()
        spans = []
        for e in gpu:
            dur = e.time_range.elapsed_us()
            spans.append((e.time_range.start, e.time_range.end))
            self.kernels[e.name] += 1
            self.kernel_us[e.name] += dur
        self.busy_us = _union(spans)
        self.dtoh = sum(n for k, n in self.kernels.items() if "DtoH" in k or "Device -> Host" in k
                        or "Device -> Pageable" in k or "Device -> Pinned" in k)
        cpu = [e for e in events if e.device_type != torch.autograd.DeviceType.CUDA]
        self.calls = collections.Counter(e.name for e in cpu)
        # ops by their own GPU time (kernels attributed to the op that launched them)
        self.op_gpu_us = collections.Counter()
        for e in cpu:
            if not _is_api_call(e.name):  # aten ops, autograd Functions, record_function
                t = getattr(e, "self_device_time_total", None)
                if t is None:
                    t = getattr(e, "self_cuda_time_total", 0)
                if t:
                    self.op_gpu_us[e.name] += t
        self.op_cpu_us = collections.Counter()
        self.compute_ops = collections.Counter()
        for e in cpu:
            if not e.name.startswith("aten::"):
                continue
            self.op_cpu_us[e.name] += e.self_cpu_time_total
            if e.name not in NO_KERNEL and _computes_itself(e):
                self.compute_ops[e.name] += 1

    @property
    def aten_ops(self) -> collections.Counter:
        return collections.Counter({k: v for k, v in self.calls.items() if k.startswith("aten::")})


def _computes_itself(e) -> bool:
    """No aten op that computes runs inside ``e`` (then ``e``'s own kernels are the work:
    one launch or more on a GPU)."""
    for c in e.cpu_children:
        if c.name.startswith("aten::") and (c.name not in NO_KERNEL or not _computes_itself(c)):
            return False
    return True


def _union(spans) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def per_step(big: collections.Counter, small: collections.Counter, steps: int) -> dict:
    """``(big - small) / steps`` for every key of either (the marginal cost of one step)."""
    return {k: (big.get(k, 0) - small.get(k, 0)) / steps for k in set(big) | set(small)}


def _top(d: dict, n: int, fmt: str = "{:10.2f}") -> list[str]:
    """The ``n`` largest positive values of ``d`` (differences of two runs can come out
    slightly negative for ops that the longer run does not repeat)."""
    rows = sorted(((v, k) for k, v in d.items() if v > 1e-9), reverse=True)[:n]
    return [f"  {fmt.format(v)}  {k}" for v, k in rows]


# ------------------------------------------------------------------------------- phases
def _phase(name, small: Profiled, big: Profiled, steps: int, cuda: bool, top: int):
    """Summary numbers and report lines of one phase from its two profiled calls."""
    wall_ms = (big.wall_s - small.wall_s) * 1e3 / steps
    s = {"step_ms": wall_ms}
    lines = [f"== {name}: marginal per step ({steps} extra steps), {wall_ms:.2f} ms wall"]
    aten = per_step(big.aten_ops, small.aten_ops, steps)
    leaf = per_step(big.compute_ops, small.compute_ops, steps)
    s["aten_ops_per_step"] = sum(aten.values())
    s["compute_ops_per_step"] = sum(leaf.values())
    flagged = {k: v for k, v in aten.items() if k in SYNC_OPS and v > 0}
    s["sync_ops_per_step"] = sum(flagged.values())
    lines.append(f"aten ops per step: {s['aten_ops_per_step']:.1f}; computing ops (not views or "
                 f"allocations, no computing op inside: each launches at least one kernel on a "
                 f"GPU): {s['compute_ops_per_step']:.1f}")
    lines.append("ops that would synchronise a GPU with the host, per step:"
                 + ("" if flagged else " none"))
    lines += _top(flagged, top, "{:8.2f}")
    lines.append("computing aten ops per step (count):")
    lines += _top(leaf, 10 ** 6, "{:8.2f}")
    lines.append("self CPU time per step by aten op (us):")
    lines += _top(per_step(big.op_cpu_us, small.op_cpu_us, steps), top)
    if cuda:
        calls = per_step(big.calls, small.calls, steps)
        launches = {k: v for k, v in calls.items() if is_launch(k)}
        syncs = {k: v for k, v in calls.items() if is_sync(k)}
        kernels = per_step(big.kernels, small.kernels, steps)
        s["kernels_per_step"] = sum(kernels.values())
        s["launch_calls_per_step"] = sum(launches.values())
        s["graph_launches_per_step"] = sum(v for k, v in launches.items() if "Graph" in k)
        s["host_syncs_per_step"] = sum(syncs.values())
        s["dtoh_copies_per_step"] = (big.dtoh - small.dtoh) / steps
        s["sync_warnings_per_step"] = (sum(big.sync_warnings.values())
                                       - sum(small.sync_warnings.values())) / steps
        busy = (big.busy_us - small.busy_us) / 1e3 / steps
        s["gpu_busy_fraction"] = busy / wall_ms if wall_ms > 0 else float("nan")
        s["gpu_busy_ms"] = busy
        lines.append(f"GPU busy {busy:.3f} ms of {wall_ms:.3f} ms ({s['gpu_busy_fraction']:.1%}); "
                     f"{s['kernels_per_step']:.1f} kernels/copies, {s['launch_calls_per_step']:.1f} "
                     f"launch calls ({s['graph_launches_per_step']:.2f} graph launches), "
                     f"{s['host_syncs_per_step']:.2f} host syncs, {s['dtoh_copies_per_step']:.2f} "
                     f"device-to-host copies, {s['sync_warnings_per_step']:.2f} sync warnings")
        lines.append("launch calls per step:")
        lines += _top(launches, top, "{:8.2f}")
        lines.append("host synchronisations per step:" + ("" if syncs else " none"))
        lines += _top(syncs, top, "{:8.2f}")
        warned = per_step(big.sync_warnings, small.sync_warnings, steps)
        lines.append("set_sync_debug_mode warnings per step, by source line:"
                     + ("" if any(v > 0 for v in warned.values()) else " none"))
        lines += _top(warned, top, "{:8.2f}")
        lines.append("GPU time per step by op (us, kernels attributed to the op that launched "
                     "them):")
        lines += _top(per_step(big.op_gpu_us, small.op_gpu_us, steps), top)
        lines.append("GPU time per step by kernel (us):")
        lines += _top(per_step(big.kernel_us, small.kernel_us, steps), top)
        lines.append("kernels per step (count):")
        lines += _top(kernels, top, "{:8.2f}")
    lines += ["", f"-- torch.profiler table of the longer call ({name}), by self CPU time:",
              big.table_cpu]
    if cuda:
        lines += [f"-- torch.profiler table of the longer call ({name}), by self GPU time:",
                  big.table_gpu]
    return s, lines


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-genes", type=int, default=None, help="default 8000 (CUDA), 2000 (CPU)")
    p.add_argument("--n-batches", type=int, default=128)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=None, help="default 1024 (CUDA), 256 (CPU)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="training steps per epoch (the store's size); default 16 (CUDA), 4 (CPU)")
    p.add_argument("--epochs", type=int, default=None,
                   help="extra epochs of the longer call; default 2 (CUDA), 1 (CPU)")
    p.add_argument("--embed-batch-size", type=int, default=None,
                   help="default 16384 (CUDA), 1024 (CPU)")
    p.add_argument("--batches", type=int, default=4, help="embedding batches of the shorter call")
    p.add_argument("--n-hidden", type=int, default=None, help="override the preset")
    p.add_argument("--n-latent", type=int, default=None, help="override the preset")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset")
    p.add_argument("--impl", default="auto")
    p.add_argument("--precision", default="32", choices=sorted(PRECISION_LABEL))
    p.add_argument("--cuda-graph", default="auto", choices=sorted(CUDA_GRAPH))
    p.add_argument("--top", type=int, default=25, help="rows of the top-ops tables")
    p.add_argument("--workdir", default="/tmp/scvi_fast_bench")
    p.add_argument("--out", default=None, help="folder of the report (default: results folder)")
    p.add_argument("--no-record", action="store_true", help="write no profile.csv rows")
    p.add_argument("--notes", default="")
    a = p.parse_args(argv)

    import scvi_fast

    cuda = str(a.device).startswith("cuda")
    genes = a.n_genes or (8000 if cuda else 2000)
    bs = a.batch_size or (1024 if cuda else 256)
    spe = a.steps_per_epoch or (16 if cuda else 4)
    extra = a.epochs or (2 if cuda else 1)
    ebs = a.embed_batch_size or (16384 if cuda else 1024)
    train_cells = spe * bs
    # one store for both phases: the training calls take a 1/2^k share of it (exactly, so that
    # no cell spills into a validation set) and embedding reads its first cells
    n_cells = train_cells * 2 ** max(0, math.ceil(math.log2(2 * a.batches * ebs / train_cells)))
    key = (n_cells, genes, a.n_batches, a.density)
    store = C.synthetic_store(C.synthetic_path(a.workdir, *key, ".store"), *key)
    arch = {k: v for k, v in (("n_hidden", a.n_hidden), ("n_latent", a.n_latent),
                              ("n_layers", a.n_layers)) if v is not None}
    model = scvi_fast.SCVI(str(store), preset="census", impl=a.impl, **arch)
    kw = train_kwargs(a.precision, a.cuda_graph)

    def train(epochs):
        model.train(max_epochs=epochs, batch_size=bs, train_size=train_cells / n_cells,
                    validation_size=0.0, n_epochs_kl_warmup=None, device=a.device,
                    progress_bar=False, **kw)

    def embed(n_batches):
        model.get_latent_representation(str(store), indices=range(n_batches * ebs),
                                        batch_size=ebs)

    t0 = time.perf_counter()
    train(1)  # warm-up: kernel compilation, caches, first-touch pages
    embed(1)
    warm = time.perf_counter() - t0
    n_steps = math.ceil(len(model.train_indices) / bs)
    assert len(model.validation_indices) == 0
    phases = {}
    phases["train_step"] = (Profiled(lambda: train(1), cuda), Profiled(lambda: train(1 + extra),
                                                                        cuda), n_steps * extra)
    phases["embed_batch"] = (Profiled(lambda: embed(a.batches), cuda),
                             Profiled(lambda: embed(2 * a.batches), cuda), a.batches)
    impl = scvi_fast.functional.resolve_impl(a.impl, torch.device(model.device))
    graph = kw.get("cuda_graph", "not supported")
    head = [f"profile_step: {C.device_name(a.device)}, torch {torch.__version__}, git "
            f"{C.git_sha()}, impl {impl}, precision {a.precision}, cuda_graph "
            f"{a.cuda_graph if 'cuda_graph' in kw else graph}",
            f"store {n_cells} x {genes} ({a.density:.0%} non-zero, {a.n_batches} batches); train "
            f"batch {bs}, {n_steps} steps per epoch; embedding batch {ebs}; warm-up {warm:.1f} s",
            f"model: {model}", ""]
    out = Path(a.out) if a.out else C.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"profile_{'cuda' if cuda else 'cpu'}.txt"
    lines, rows = list(head), []
    shape = {"cells": train_cells, "genes": genes, "batches": a.n_batches, "density": a.density}
    config = {"batch_size": bs, "embed_batch_size": ebs, "precision": a.precision,
              "cuda_graph": a.cuda_graph if "cuda_graph" in kw else "not supported",
              "preset": "census", **arch}
    units = {"step_ms": "ms", "gpu_busy_fraction": "ratio", "gpu_busy_ms": "ms"}
    for name, (small, big, n) in phases.items():
        s, ph = _phase(name, small, big, n, cuda, a.top)
        lines += ph + [""]
        for metric, v in s.items():
            rows.append(C.result_row(f"profile:{name}", "scvi_fast", metric,
                                     units.get(metric, "per step"), v, impl=impl,
                                     mode=PRECISION_LABEL[a.precision], shape=shape,
                                     config=config, notes=a.notes))
        print("\n".join(ph[: ph.index("") if "" in ph else len(ph)][:40]), flush=True)
    report.write_text("\n".join(lines))
    print(f"report in {report}")
    if not a.no_record:
        print(f"rows in {C.record('profile.csv', rows, device=a.device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
