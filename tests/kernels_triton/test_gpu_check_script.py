"""``benchmarks/gpu_check_kernels.py --cpu``: the GPU check at a tiny shape, interpreted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _triton_helpers import HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gpu_check_script_cpu_mode():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check_kernels.py"), "--cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "ALL CHECKS PASS" in proc.stdout
    assert "NB achieved bandwidth" in proc.stdout
