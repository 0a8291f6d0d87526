"""Shared benchmark plumbing: environment description, CSV rows, synthetic inputs, statistics.

Every row a benchmark appends carries the date, git sha, device name, package versions and
the machine's load average, so rows taken on a shared machine can be judged; ratios are only
ever computed between cases measured in the same run.

Environment variables:

* ``SCVI_FAST_RESULTS``: the folder the CSVs are appended to (default
  ``benchmarks/results``); the GPU suite points it at its output folder.
* ``SCVI_FAST_GIT_SHA``: the git sha to stamp rows with, for a copy of the checkout without
  its ``.git`` (e.g. on a machine the working tree was copied to).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("SCVI_FAST_RESULTS") or ROOT / "benchmarks" / "results")
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
    """The CPU model, or the CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'; ' xN' appended
    when N > 1 devices are visible)."""
    if str(device).startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        n = torch.cuda.device_count()
        return f"{name} x{n}" if n > 1 else name
    return cpu_name()


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """Short sha of HEAD, ``-dirty`` when ``scvi_fast`` or ``csrc`` differ from it;
    ``$SCVI_FAST_GIT_SHA`` when set."""
    if os.environ.get("SCVI_FAST_GIT_SHA"):
        return os.environ["SCVI_FAST_GIT_SHA"]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "scvi_fast", "csrc"],
                               cwd=ROOT).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def versions(python: str = sys.executable) -> str:
    """JSON of the versions of the packages that matter, as seen by ``python``."""
    code = ("import importlib.metadata as m, json, platform\n"
            "out = {'python': platform.python_version()}\n"
            "for p in ('torch', 'triton', 'numpy', 'scipy', 'numba', 'pandas', 'anndata',"
            " 'scvi-tools', 'lightning', 'scvi_fast'):\n"
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


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """This process's resident set now, MB."""
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``), MB. Not ``getrusage``'s ``ru_maxrss``:
    Linux carries that over from the process that called exec, so a worker started by a big
    driver would report the driver's peak."""
    return _proc_status_mb("VmHWM")


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


def synthetic_path(workdir: Path, n_cells: int, n_genes: int, n_batches: int, density: float,
                   suffix: str, seed: int = 0) -> Path:
    """``workdir/synthetic_<cells>x<genes>_<batches>b_<density>[_s<seed>]<suffix>``: where a
    synthetic data set's ``.store`` and ``.h5ad`` live."""
    tail = f"_s{seed}" if seed else ""
    return Path(workdir) / f"synthetic_{n_cells}x{n_genes}_{n_batches}b_{density}{tail}{suffix}"


def _synthetic_params(n_cells, n_genes, n_batches, density, n_cell_types, seed) -> dict:
    """What identifies a synthetic data set, the generator's version included (files made by
    an older generator are not reused)."""
    from scvi_fast.data._synthetic import GENERATOR_VERSION

    return {"n_cells": int(n_cells), "n_genes": int(n_genes), "n_batches": int(n_batches),
            "density": float(density), "n_cell_types": int(n_cell_types), "seed": int(seed),
            "version": GENERATOR_VERSION}


def synthetic_store(path: Path, n_cells: int, n_genes: int, n_batches: int, density: float,
                    n_cell_types: int = 10, seed: int = 0) -> Path:
    """A synthetic CSR store at ``path``, streamed straight from the generator
    (:func:`scvi_fast.data.write_synthetic_store`); reused when one with the same parameters
    exists. Batch key ``batch``, labels key ``cell_type``."""
    from scvi_fast.data import CSRStore, StoreCorruptError, write_synthetic_store

    path = Path(path)
    want = _synthetic_params(n_cells, n_genes, n_batches, density, n_cell_types, seed)
    try:
        store = CSRStore.open(path)
        syn = store.manifest.get("synthetic", {})
        have = dict(syn, n_cells=store.n_cells, n_genes=store.n_genes)
        if all(have.get(k) == v for k, v in want.items()):
            return path
    except (FileNotFoundError, StoreCorruptError):
        pass
    t0 = time.perf_counter()
    store = write_synthetic_store(path, n_cells, n_genes=n_genes, n_batches=n_batches,
                                  n_cell_types=n_cell_types, density=density, seed=seed,
                                  overwrite=True)
    print(f"wrote {path} ({n_cells} x {n_genes}, {store.nnz / max(n_cells * n_genes, 1):.1%} "
          f"non-zero) in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def synthetic_h5ad(path: Path, n_cells: int, n_genes: int, n_batches: int, density: float,
                   n_cell_types: int = 10, seed: int = 0) -> Path:
    """A synthetic count ``.h5ad`` at ``path`` (the cells of :func:`synthetic_store`, whose
    store ``path.with_suffix(".store")`` is written first when missing); reused when one with
    the same parameters exists. Only the consumers that need an ``.h5ad`` (scvi-tools, the
    in-memory cases) should ask for one: the store is what scvi_fast reads fastest."""
    import anndata

    from scvi_fast.data import CSRStore, write_h5ad

    path = Path(path)
    want = _synthetic_params(n_cells, n_genes, n_batches, density, n_cell_types, seed)
    if path.exists():
        try:
            a = anndata.read_h5ad(path, backed="r")
            have = dict(a.uns.get("synthetic", {}))
            a.file.close()
            if {k: have.get(k) for k in want} == want:
                return path
        except (OSError, KeyError, ValueError):
            pass
    store = synthetic_store(path.with_suffix(".store"), n_cells, n_genes, n_batches, density,
                            n_cell_types, seed)
    t0 = time.perf_counter()
    ad = CSRStore.open(store).to_anndata()
    ad.uns["synthetic"] = want
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h5ad(ad, path)
    print(f"wrote {path} from {store.name} in {time.perf_counter() - t0:.1f} s", flush=True)
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


def stream_worker(python: str, script: str, args: list[str], timeout: float, env_extra=None):
    """Run ``script --worker ...`` in a fresh process and yield every stdout line that is a
    JSON object as soon as it is printed (a worker reporting case by case keeps what it
    measured when it is cut short). Raises when the worker fails or runs past ``timeout``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    deadline = time.monotonic() + timeout
    with subprocess.Popen([python, script, "--worker", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as proc:
        import threading

        err: list[str] = []
        reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
        reader.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                line = line.strip()
                if line.startswith("{"):
                    yield json.loads(line)
                elif line:
                    print(f"    | {line}", flush=True)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        reader.join(5)
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {args} ran past {timeout:.0f} s")
        if proc.returncode != 0:
            raise RuntimeError(f"worker {args} failed:\n{''.join(err)[-4000:]}")


def read_results(name: str):
    """``benchmarks/results/<name>`` (long schema) as a DataFrame, ``config`` parsed to dicts."""
    import pandas as pd

    df = pd.read_csv(RESULTS / name, dtype={"git_sha": str, "shape": str, "notes": str},
                     keep_default_na=False, na_values={"median": [""], "p20": [""],
                                                       "p80": [""], "n": [""]})
    if list(df.columns) != RESULT_FIELDS:
        raise ValueError(f"{RESULTS / name} is not in the long schema (columns "
                         f"{list(df.columns)[:6]}...)")
    df["config"] = [json.loads(c) if c else {} for c in df["config"]]
    return df


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0
