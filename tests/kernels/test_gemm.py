"""The oneDNN GEMMs of the CPU path (``scvi_fast.kernels._gemm``) against torch.

float32 results must match ``torch.mm`` / ``F.linear`` to float32 rounding of sums over
the inner dimension (norm-wise 1e-5 at inner sizes up to 8000: ~sqrt(n) ulps of 1.2e-7),
for contiguous and transposed (strided) operands and odd shapes; float64 always takes
torch's path and matches exactly.
"""

from __future__ import annotations

import pytest
import torch

from scvi_fast.kernels import _gemm


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(params=["onednn", "torch"])
def backend(request, monkeypatch):
    if request.param == "onednn" and not _gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN")  # the torch case still runs
    monkeypatch.setitem(_gemm._STATE, "ok", request.param == "onednn")
    return request.param


@pytest.mark.parametrize("B,K,N", [(1024, 512, 8000), (37, 23, 301), (1, 1, 1), (5, 3, 0)])
def test_linear_mm_mm_t(B, K, N, backend):
    g = torch.Generator().manual_seed(B * 7 + K)
    x = torch.randn(B, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    d = torch.randn(B, N, generator=g)
    cases = [
        (_gemm.linear(x, w, b), torch.addmm(b, x, w.t())),
        (_gemm.linear(x, w, None), x @ w.t()),
        (_gemm.mm(d, w), d @ w),  # the input gradient of the layer
        (_gemm.mm_t(d, x), d.t() @ x),  # its weight gradient
    ]
    for got, want in cases:
        assert got.shape == want.shape and got.dtype == torch.float32
        if want.numel() and want.abs().max() > 0:
            assert _rel(got, want) <= 1e-5
        else:  # empty inner dimension: exact zeros
            assert torch.equal(got, want)


def test_float64_uses_torch():
    x = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(_gemm.linear(x, w), torch.nn.functional.linear(x, w))
    assert torch.equal(_gemm.mm_t(x, x), x.t() @ x)


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("SCVI_FAST_GEMM", "torch")
    assert _gemm._probe() is False
