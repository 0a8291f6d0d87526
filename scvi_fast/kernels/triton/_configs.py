"""Launch configurations of the Triton kernels: one default and a few candidates per kernel.

Each launcher asks :func:`choose` for its configuration, giving the kernel's name, a key
(the shape and dtype it depends on), its candidates (the first is the default) and a
``bench`` callable that runs the launch for one candidate. What comes back:

* a configuration forced with :func:`forced` (``benchmarks/bench_kernels.py --sweep`` times
  every candidate this way and reports the fastest);
* otherwise the default, unless ``SCVI_FAST_AUTOTUNE=1``: then, on a CUDA device, every
  candidate is timed at the first call for a key and the fastest is kept for the process.
  That first call must be an eager warm-up, not inside CUDA-graph capture (during capture
  an unseen key gets the default). ``bench`` callables reset what their launch accumulates
  into, so timing repeats never changes a result.

``SCVI_FAST_AUTOTUNE=0`` (or unset) always gives the defaults: deterministic launches for
tests and for runs that must be reproducible bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

_forced: dict[str, dict] = {}
_tuned: dict[tuple, dict] = {}


def autotune_enabled() -> bool:
    """Whether ``SCVI_FAST_AUTOTUNE=1`` asks for timing the candidates (read at each call)."""
    return os.environ.get("SCVI_FAST_AUTOTUNE", "0").strip().lower() in ("1", "true", "on")


@contextlib.contextmanager
def forced(name: str, config: dict) -> Iterator[None]:
    """Launch kernel ``name`` with ``config`` inside the block (for sweeps and tests)."""
    before = _forced.get(name)
    _forced[name] = dict(config)
    try:
        yield
    finally:
        if before is None:
            _forced.pop(name, None)
        else:
            _forced[name] = before


def choose(
    name: str,
    key: tuple,
    candidates: Sequence[dict],
    bench: Callable[[dict], None] | None = None,
    device: torch.device | None = None,
) -> dict:
    """The configuration to launch kernel ``name`` with (see module docstring)."""
    if name in _forced:
        return _forced[name]
    if bench is None or len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    if device is None or device.type != "cuda":
        return candidates[0]
    cached = _tuned.get((name, key))
    if cached is not None:
        return cached
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton.testing import do_bench

    times = [do_bench(lambda c=c: bench(c), warmup=5, rep=25) for c in candidates]
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _tuned[(name, key)] = best
    return best


def unique(cands: list[dict]) -> tuple[dict, ...]:
    """The candidates without repeats (small shapes make some coincide), in order; a tuple,
    since the candidate lists are cached."""
    out = []
    for c in cands:
        if c not in out:
            out.append(c)
    return tuple(out)


def tuned() -> dict[tuple, dict]:
    """The configurations chosen by timing so far, by ``(kernel, key)``."""
    return dict(_tuned)
