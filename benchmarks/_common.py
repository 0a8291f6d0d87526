"""Shared benchmark plumbing: environment description, CSV rows, synthetic inputs, statistics.

Every row a benchmark appends carries the date, git sha, device name, package versions and
the machine's load average, so rows taken on a shared machine can be judged; ratios are only
ever computed between cases measured in the same run.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: str = "cpu") -> str:
    """The CPU model, or the CUDA device name (e.g. 'NVIDIA H100 80GB HBM3')."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def git_sha() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "scvi_fast", "csrc"],
                               cwd=ROOT).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(python: str = sys.executable) -> str:
    """JSON of the versions of the packages that matter, as seen by ``python``."""
    code = ("import importlib.metadata as m, json\n"
            "out = {}\n"
            "for p in ('torch', 'triton', 'numpy', 'scipy', 'numba', 'anndata', 'scvi-tools',"
            " 'scvi_fast'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        return subprocess.check_output([python, "-c", code], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "{}"


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_rows(name: str, rows: list[dict], fields: list[str]) -> Path:
    """Append ``rows`` to ``benchmarks/results/<name>`` (header written once)."""
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


#: the one long schema of every results CSV (one row per measured quantity)
RESULT_FIELDS = [
    "date", "git_sha", "what", "provider", "impl", "mode", "metric", "unit", "shape",
    "median", "p20", "p80", "n", "config", "device", "versions", "load_avg", "notes",
]


def summary(values) -> dict:
    """``median``, ``p20``, ``p80`` and ``n`` of repeated measurements (medians, not single runs;
    the 20th/80th percentiles show the spread without being dominated by one noisy repeat)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"median": "", "p20": "", "p80": "", "n": 0}
    return {"median": float(np.median(v)), "p20": float(np.percentile(v, 20)),
            "p80": float(np.percentile(v, 80)), "n": int(v.size)}


def result_row(what: str, provider: str, metric: str, unit: str, values, *, impl: str = "",
               mode: str = "", shape: str | dict = "", config: dict | None = None,
               notes: str = "") -> dict:
    """One row of the long schema for ``values`` (a list of repeats, or one number).

    ``what``: the benchmark and case (``"train"``, ``"embed"``, ``"kernel:nb_softmax_loglik"``,
    ``"loader"``...); ``provider``: who computed it (``"scvi_fast"``, ``"scvi-tools"``,
    ``"torch"``...); ``impl``: the back-end where it matters; ``mode``: the variant (``"fp32"``,
    ``"fwd+bwd"``, ``"store"``...); ``metric`` and ``unit``: e.g. ``"cells_per_s"`` /
    ``"cells/s"``, ``"time"`` / ``"ms"``, ``"bandwidth"`` / ``"GB/s"``, ``"ratio_vs_scvi_tools"``
    / ``"x"``; ``shape``: ``"B=1024,G=8000,H=512"`` or a dict of the same; ``config``: any
    other settings, stored as JSON.
    """
    if isinstance(values, (int, float, np.integer, np.floating)):
        values = [values]
    if isinstance(shape, dict):
        shape = ",".join(f"{k}={v}" for k, v in shape.items())
    row = {"what": what, "provider": provider, "impl": impl, "mode": mode, "metric": metric,
           "unit": unit, "shape": shape, "config": json.dumps(config or {}, sort_keys=True),
           "notes": notes}
    row.update({k: (round(v, 6) if isinstance(v, float) else v)
                for k, v in summary(values).items()})
    return row


def record(name: str, rows: list[dict], device: str = "cpu", python: str = sys.executable,
           load_avg_start: str | None = None) -> Path:
    """Append ``rows`` (from :func:`result_row`) to ``benchmarks/results/<name>`` in the long
    schema, each stamped with the date, git sha, device name, package versions (as seen by
    ``python``) and the machine's load average (``start -> now`` when a start is given).

    Call it as results come (after each case), so that a run cut short keeps what it measured.
    """
    stamp = {"date": now(), "git_sha": git_sha(), "device": device_name(device),
             "versions": versions(python),
             "load_avg": f"{load_avg_start} -> {load_avg()}" if load_avg_start else load_avg()}
    return append_rows(name, [dict(r, **{k: v for k, v in stamp.items() if not r.get(k)})
                              for r in rows], RESULT_FIELDS)


def spread(values) -> dict:
    """Median and 10th/90th percentiles (ratios need medians of repeated runs)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return {"median": float("nan"), "p10": float("nan"), "p90": float("nan"), "n": 0}
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "n": int(v.size)}


def synthetic_h5ad(path: Path, n_cells: int, n_genes: int, n_batches: int, density: float,
                   n_cell_types: int = 10, seed: int = 0) -> Path:
    """Write (once; reused when the same shape exists) a synthetic count ``.h5ad``."""
    import anndata

    path = Path(path)
    if path.exists():
        a = anndata.read_h5ad(path, backed="r")
        ok = a.shape == (n_cells, n_genes) and a.uns.get("bench_density") == density and \
            a.obs["batch"].nunique() == n_batches
        a.file.close()
        if ok:
            return path
    from scvi_fast.data import synthetic_anndata

    t0 = time.perf_counter()
    ad = synthetic_anndata(n_cells=n_cells, n_genes=n_genes, n_batches=n_batches,
                           n_cell_types=n_cell_types, density=density, seed=seed)
    ad.uns["bench_density"] = density
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.write_h5ad(path)
    print(f"wrote {path} ({n_cells} x {n_genes}, {ad.X.nnz / (n_cells * n_genes):.1%} non-zero)"
          f" in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def run_worker(python: str, script: str, args: list[str], timeout: float, env_extra=None) -> dict:
    """Run ``script --worker ...`` in a fresh process; its last stdout line is a JSON result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    proc = subprocess.run([python, script, "--worker", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0
