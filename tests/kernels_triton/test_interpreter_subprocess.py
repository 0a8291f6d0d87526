"""Run the ``test_triton_*.py`` modules under ``TRITON_INTERPRET=1`` in a fresh process.

Only active without a GPU and without ``TRITON_INTERPRET`` set for this run (see conftest.py);
otherwise those modules are collected and run directly and this test skips. Few processes: each
start-up (torch + triton) costs several seconds on a small machine; the slowest modules get
one each, so that no single test runs for long.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _triton_helpers import HAS_TRITON, RUN_HERE

HERE = Path(__file__).resolve().parent
MODULES = sorted(p.name for p in HERE.glob("test_triton_*.py"))
ALONE = ["test_triton_model.py", "test_triton_sparse_linear.py", "test_triton_zinb_poisson.py"]
GROUPS = [[m] for m in ALONE] + [[m for m in MODULES if m not in ALONE]]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(RUN_HERE, reason="the Triton tests run in this process (GPU or interpreter)")
@pytest.mark.parametrize("modules", GROUPS, ids=lambda g: "+".join(m[12:-3] for m in g))
def test_triton_modules_under_interpreter(modules):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
         *(str(HERE / m) for m in modules)],
        cwd=HERE.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(
            "the Triton tests failed under TRITON_INTERPRET=1:\n"
            f"{proc.stdout[-12000:]}\n{proc.stderr[-2000:]}"
        )
