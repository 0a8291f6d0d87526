"""lgamma and digamma in plain Triton against torch, over the range the NB op uses."""

from __future__ import annotations

import torch

from scvi_fast.reference._accuracy import assert_accurate


def _arguments(device) -> torch.Tensor:
    """x + theta from 1e-4 to 1e6 (dense log grid plus random points), integers (counts + 1),
    the recurrence boundary at 12, and the roots of lgamma (1, 2) and digamma (1.4616...)."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.logspace(-4, 6, 4001, dtype=torch.float64)
    rand = 10 ** (torch.rand(2000, generator=gen, dtype=torch.float64) * 10 - 4)
    ints = torch.arange(1, 200, dtype=torch.float64)
    special = torch.tensor(
        [1.0, 2.0, 1.4616321449683622, 11.999999, 12.0, 12.000001, 1e-4, 1e6], dtype=torch.float64
    )
    return torch.cat([grid, rand, ints, special]).to(device)


def test_lgamma_digamma_float64(tk, device):
    x = _arguments(device)
    lg, dg = tk._kernels("_math").special(x)
    assert lg.dtype == dg.dtype == torch.float64
    assert_accurate("lgamma", lg, torch.lgamma(x))
    assert_accurate("digamma", dg, torch.digamma(x))


def test_lgamma_digamma_float32(tk, device):
    x32 = _arguments(device).float()
    lg, dg = tk._kernels("_math").special(x32)
    assert lg.dtype == dg.dtype == torch.float32
    assert_accurate("lgamma", lg, torch.lgamma(x32.double()))
    assert_accurate("digamma", dg, torch.digamma(x32.double()))
