"""Run the ``test_triton_*.py`` modules under ``TRITON_INTERPRET=1`` in a fresh process.

Only active without a GPU and without ``TRITON_INTERPRET`` set for this run (see conftest.py);
otherwise those modules are collected and run directly and this test skips. One process for
all of them: each start-up (torch + triton) costs several seconds on a small machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _triton_helpers import HAS_TRITON, RUN_HERE

HERE = Path(__file__).resolve().parent
MODULES = sorted(str(p) for p in HERE.glob("test_triton_*.py"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(RUN_HERE, reason="the Triton tests run in this process (GPU or interpreter)")
def test_triton_modules_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *MODULES],
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
