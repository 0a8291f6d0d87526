"""The embedding with ``impl="triton"``: the streamed result (int32 gene indices, reused input
slots) is bitwise a plain per-batch loop's (int64 indices), and close to the torch back-end's."""

from __future__ import annotations

import numpy as np
import torch

from scvi_fast.analysis import _latent, latent_fn
from scvi_fast.data import CSRLoader, synthetic_anndata
from scvi_fast.module import VAE


def test_triton_embedding_matches_plain_loop(device):
    ad = synthetic_anndata(n_cells=45, n_genes=37, n_batches=2, n_cell_types=2, seed=5)
    vae = VAE(n_input=37, n_batch=2, n_hidden=16, n_latent=3, n_layers=2, impl="triton").to(device)
    vae.eval()
    loader = CSRLoader(ad, batch_size=17, shuffle=False, prefetch=False)  # 17 + 17 + 11 cells
    fn = latent_fn(vae, return_dist=True)
    with torch.inference_mode():
        want = np.concatenate([fn(mb.to(device)).cpu().numpy() for mb in loader])
        vae.impl = "torch"
        torch_ref = np.concatenate([fn(mb.to(device)).cpu().numpy() for mb in loader])
        vae.impl = "triton"
        for copy_inputs in (False, True):
            sink = _latent._Arrays(45, 3, with_var=True)
            sink.mean.fill(np.nan)
            sink.var.fill(np.nan)
            rows = _latent._stream(fn, loader, device, sink, 2, False, 45, copy_inputs=copy_inputs)
            assert rows == 45
            got = np.concatenate([sink.mean, sink.var], axis=1)
            np.testing.assert_array_equal(got, want)
    # float32 against float32, summed in another order: a few ulps of the values
    np.testing.assert_allclose(want, torch_ref, rtol=1e-5, atol=1e-6)
