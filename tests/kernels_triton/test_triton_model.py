"""The VAE with ``impl="triton"`` reproduces ``impl="torch"`` (loss and every parameter
gradient) on the scvi-tools fixture models, at 8 cells."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_model_accurate, model_loss_and_grads

N_CELLS = 8


# one precision per fixture keeps the interpreter time down (default: G=1287, one layer of
# 128; deep: G=128, two layers of 512, Z=50)
@pytest.mark.parametrize("name, dtype", [("default", torch.float64), ("deep", torch.float32)])
def test_model_triton_matches_torch(device, name, dtype):
    def run(impl, dtype):
        return model_loss_and_grads(name, impl, dtype, N_CELLS, device)

    want32 = run("torch", torch.float32) if dtype == torch.float32 else None
    assert_model_accurate(run("triton", dtype), run("torch", torch.float64), want32)
