"""``OutputLinear``: an ``nn.Linear`` with a column-major weight, same outside behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scvi_fast.module import VAE
from scvi_fast.module._layers import OutputLinear


def test_same_init_and_output_as_nn_linear():
    torch.manual_seed(3)
    ref = nn.Linear(7, 13)
    torch.manual_seed(3)
    out = OutputLinear(7, 13)
    assert out.weight_t.shape == (7, 13) and out.weight_t.is_contiguous()
    assert out.weight.shape == (13, 7)
    torch.testing.assert_close(out.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(out.bias, ref.bias, rtol=0, atol=0)
    x = torch.randn(5, 7)
    torch.testing.assert_close(out(x), ref(x), rtol=0, atol=0)


def test_state_dict_speaks_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(6, 11)
    out = OutputLinear(6, 11)
    sd = out.state_dict()
    assert list(sd) == list(ref.state_dict()) == ["weight", "bias"]
    assert sd["weight"].shape == (11, 6) and sd["weight"].is_contiguous()
    torch.testing.assert_close(sd["weight"], out.weight.detach(), rtol=0, atol=0)
    # nn.Linear's state loads into OutputLinear and back, value for value
    out.load_state_dict(ref.state_dict())
    torch.testing.assert_close(out.weight, ref.weight, rtol=0, atol=0)
    assert out.weight_t.is_contiguous()
    ref2 = nn.Linear(6, 11)
    ref2.load_state_dict(out.state_dict())
    torch.testing.assert_close(ref2.weight, ref.weight, rtol=0, atol=0)


def test_load_errors_name_weight():
    out = OutputLinear(6, 11)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(11, 6\)"):
        out.load_state_dict({"weight": torch.zeros(6, 11), "bias": torch.zeros(11)})
    with pytest.raises(RuntimeError, match="Missing key.*\"weight\""):
        out.load_state_dict({"bias": torch.zeros(11)})
    with pytest.raises(RuntimeError, match="Unexpected key.*\"extra\""):
        out.load_state_dict({"weight": torch.zeros(11, 6), "bias": torch.zeros(11),
                             "extra": torch.zeros(1)})
    res = out.load_state_dict({"bias": torch.ones(11)}, strict=False)
    assert res.missing_keys == ["weight"] and (out.bias == 1).all()


@pytest.mark.parametrize("impl", ["native", "torch"])
def test_vae_output_weight_gradient_keeps_the_layout(impl):
    """The decoder's output weight gradient lands column-major, like its parameter
    (no transposing copy by autograd), and equals the row-major model's gradient."""
    import copy

    import numpy as np

    from scvi_fast.reference._random import random_csr
    from tests.helpers import csr_batch

    rng = np.random.default_rng(1)
    counts = random_csr(rng, 32, 40, 0.3, max_count=5).dense(40, torch.float32)
    counts[:, 0] += 1  # no empty cell
    x = csr_batch(counts, batch=rng.integers(0, 3, 32))
    torch.manual_seed(0)
    vae = VAE(40, n_batch=3, n_hidden=16, n_latent=4, dropout_rate=0.0, impl=impl)
    ref = copy.deepcopy(vae)
    ref.decoder.scale = nn.Linear(16, 40)
    ref.decoder.scale.load_state_dict(vae.decoder.scale.state_dict())
    torch.manual_seed(5)
    vae(x)[2].loss.backward()
    torch.manual_seed(5)
    ref(x)[2].loss.backward()
    w = vae.decoder.scale.weight_t
    assert w.grad is not None and w.grad.is_contiguous() and w.grad.shape == (16, 40)
    # same float32 products, possibly summed in another order by the GEMM: a few ulp
    torch.testing.assert_close(w.grad.t(), ref.decoder.scale.weight.grad, rtol=1e-5, atol=1e-7)
