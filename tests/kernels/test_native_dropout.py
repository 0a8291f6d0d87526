"""Native dropout (counter-based mask) against its definition.

Kept values are ``x / (1 - p)`` exactly (the kernel multiplies by the same rounded scale),
dropped ones exactly 0; the backward applies the same mask to the upstream gradient; the
keep fraction is within 5 binomial standard deviations of ``1 - p``; the mask follows
torch's RNG (reproducible under ``torch.manual_seed``) and shows no correlation between
neighbouring elements.
"""

from __future__ import annotations

import math

import pytest
import torch

from scvi_fast import functional
from scvi_fast.kernels import native


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1024, 512), (37, 23)])
def test_mask_scale_and_gradient(p, dtype, shape, isa):
    torch.manual_seed(7)
    x = (torch.randn(shape, dtype=dtype) + 3.0).requires_grad_()  # no exact zeros
    y = native.dropout(x, p, True)
    kept = y != 0
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    assert torch.equal(y[kept], (x.detach() * scale)[kept])
    n = x.numel()
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, frac
    g = torch.randn(shape, dtype=dtype)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * scale, torch.zeros((), dtype=dtype)))


def test_reproducible_and_fresh(native_ext):
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a = native.dropout(x, 0.5)
    b = native.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(native.dropout(x, 0.5), a)
    assert not torch.equal(a, b)  # each call draws a new seed


def test_neighbours_uncorrelated(native_ext):
    torch.manual_seed(0)
    m = (native.dropout(torch.ones(1 << 20), 0.5) != 0).double()
    n = m.numel()
    for lag in (1, 2, 16, 512):
        c = torch.corrcoef(torch.stack([m[:-lag], m[lag:]]))[0, 1].item()
        assert abs(c) < 5 / math.sqrt(n), (lag, c)


def test_edges_and_dispatch(native_ext):
    x = torch.randn(5, 3)
    assert native.dropout(x, 0.5, training=False) is x
    assert native.dropout(x, 0.0) is x
    assert torch.equal(native.dropout(x, 1.0), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="probability"):
        native.dropout(x, 1.5)
    # functional: torch keeps nn.functional.dropout's stream, native its own
    torch.manual_seed(1)
    want = torch.nn.functional.dropout(x, 0.3, True)
    torch.manual_seed(1)
    assert torch.equal(functional.dropout(x, 0.3, True, impl="torch"), want)
    assert functional.dropout(x, 0.3, False, impl="native") is x
