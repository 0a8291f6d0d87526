"""float32 GEMMs of the CPU path through oneDNN, with torch's BLAS as the fallback.

PyTorch's CPU wheels run ``torch.mm`` through MKL, whose sgemm was 15-25% slower than
oneDNN's (also shipped inside torch, as ``torch.ops.mkldnn._linear_pointwise``) on the
AMD CPUs this was measured on: at the decoder output layer of the Census preset
(1024 x 512 x 8000) MKL ran at 150-180 GFLOP/s and oneDNN at about 200 on 2 cores, for
all three products of a training step (``h @ W.T``, ``D @ W``, ``h.T @ D``).

Both compute the same fp32 products (results differ by rounding only). oneDNN is used for
float32 CPU tensors when torch was built with it and a one-off self-check against
``torch.mm`` passes; anything else (float64, GPU tensors, other builds) uses torch.
``SCVI_FAST_GEMM=torch`` turns oneDNN off.
"""

from __future__ import annotations

import os

import torch

_STATE: dict[str, bool] = {}


def onednn_available() -> bool:
    """Whether float32 CPU GEMMs go through oneDNN (checked once per process)."""
    if "ok" not in _STATE:
        _STATE["ok"] = _probe()
    return _STATE["ok"]


def _probe() -> bool:
    if os.environ.get("SCVI_FAST_GEMM", "").strip().lower() == "torch":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        a = torch.randn(37, 19, generator=g)
        w = torch.randn(23, 19, generator=g)
        b = torch.randn(23, generator=g)
        c = torch.randn(37, 29, generator=g)
        checks = [
            (op(a, w, b, "none", [], ""), torch.addmm(b, a, w.t())),
            (op(a.t(), c.t(), None, "none", [], ""), torch.mm(a.t(), c)),  # strided operands
        ]
        return all(
            got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))
            for got, want in checks
        )
    except Exception:  # an older or different build: torch's own GEMM
        return False


def _use_onednn(*ts: torch.Tensor) -> bool:
    # oneDNN has no primitive for empty operands: those (trivial) products stay with torch
    return all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() > 0 for t in ts
    ) and onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x``; ``weight`` is ``(out, in)`` as in ``nn.Linear``."""
    if _use_onednn(x, weight) and (bias is None or _use_onednn(bias)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors (views such as transposes are read in place)."""
    if _use_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return torch.mm(a, b)


def mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.T @ b``, returned as a transposed view of ``b.T @ a`` when that runs faster.

    For ``a`` ``(B, G)`` and ``b`` ``(B, H)`` (a weight gradient), oneDNN is fastest
    producing ``(H, G)``; the result is that tensor's transpose, a ``(G, H)`` view.
    """
    if _use_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(b.t(), a.t(), None, "none", [], "").t()
    return torch.mm(a.t(), b)

