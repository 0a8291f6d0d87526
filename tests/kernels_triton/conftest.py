"""Triton kernels under test: compiled on a CUDA machine, else under Triton's CPU interpreter.

Triton fixes compiled-or-interpreted when a function is decorated, its own ``triton.language``
helpers included, so ``TRITON_INTERPRET=1`` only works if it is set before ``triton`` is first
imported in the process. Setting it here, at collection, would be too late whenever something
imported triton earlier, and would leak into every other test of the run. So, without a GPU and
without the variable already set, the ``test_triton_*.py`` modules are not collected in this
process: ``test_interpreter_subprocess.py`` runs them in one fresh interpreter with
``TRITON_INTERPRET=1``. With a GPU, or when the run was started with ``TRITON_INTERPRET=1``,
they are collected and run here directly.
"""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import HAS_TRITON, ON_GPU, RUN_HERE

if not HAS_TRITON:
    collect_ignore_glob = ["test_*.py"]
elif not RUN_HERE:
    collect_ignore_glob = ["test_triton_*.py"]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def tk():
    """The Triton back-end package (kernel files load on first use)."""
    from scvi_fast.kernels import triton as backend

    assert backend.is_available(), backend.unavailable_reason()
    return backend


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty`` / ``torch.empty_like`` return NaN-filled floating tensors, so that
    any output element a kernel forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
