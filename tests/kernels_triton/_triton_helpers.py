"""Switches and small helpers shared by the Triton kernel tests.

Random count batches come from :func:`scvi_fast.reference._random.random_csr` and tolerances
from :mod:`scvi_fast.reference._accuracy`, shared with the native and model tests and with
``benchmarks/gpu_check_kernels.py``.
"""

from __future__ import annotations

import importlib.util
import os
import zlib

import torch

ON_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")
#: run the test_triton_*.py modules in this process (else in a subprocess with the interpreter)
RUN_HERE = ON_GPU or INTERPRET
try:
    HAS_TRITON = importlib.util.find_spec("triton") is not None
except ValueError:  # in sys.modules without a spec
    HAS_TRITON = True


def seed_of(*params) -> int:
    """A seed per test case, stable across processes (``hash`` of a str is salted per run)."""
    return zlib.crc32(repr(params).encode())

