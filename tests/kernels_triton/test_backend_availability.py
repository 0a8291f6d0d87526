"""Availability of the Triton back-end, and that its absence never breaks an import."""

from __future__ import annotations

import sys

import pytest
import torch

from scvi_fast import functional
from scvi_fast.kernels import triton as backend


def test_without_triton_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert not backend.is_available()
    assert "pip install triton" in backend.unavailable_reason()
    x = torch.zeros(1, 1)
    with pytest.raises(ImportError, match="unavailable"):
        csr = (torch.tensor([0, 0]), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        functional.nb_softmax_loglik(x, torch.zeros(1), torch.zeros(1), csr, impl="triton")
    with pytest.raises(ImportError, match="unavailable"):
        backend.reparam_kl(x, x, x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device makes the back-end available")
def test_needs_cuda_or_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not backend.is_available()
    assert "TRITON_INTERPRET" in backend.unavailable_reason()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.is_available()
    assert backend.unavailable_reason() is None
