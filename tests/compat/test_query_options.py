"""Reference mapping of models with batch-sized tensors beyond the decoder's batch rows: a
``"gene-batch"`` ``px_r`` and the library encoder's prior (scvi-tools pads both)."""

from __future__ import annotations

import numpy as np
import torch

import scvi_fast
from scvi_fast.data import synthetic_anndata
from scvi_fast.module._generative import init_library_size


def test_query_pads_dispersion_and_library_prior_and_trains_the_library_encoder():
    ad = synthetic_anndata(n_cells=150, n_genes=20, n_batches=3, n_cell_types=2, density=0.4,
                           seed=8)
    ad = ad[np.asarray(ad.X.sum(axis=1)).ravel() > 0].copy()
    ad.obs["batch"] = ad.obs["batch"].astype(str).astype("category")
    new = ad.obs["batch"].cat.categories[-1]
    ref_ad = ad[ad.obs["batch"] != new].copy()
    ref_ad.obs["batch"] = ref_ad.obs["batch"].cat.remove_unused_categories()
    query = ad[ad.obs["batch"] == new].copy()
    scvi_fast.SCVI.setup_anndata(ref_ad, batch_key="batch")
    ref = scvi_fast.SCVI(ref_ad, n_hidden=8, n_latent=3, dispersion="gene-batch",
                         use_observed_lib_size=False, impl="torch")
    ref.train(max_epochs=1, device="cpu", progress_bar=False)
    q = scvi_fast.SCVI.load_query_data(query, ref)
    r, m = ref.module, q.module
    assert m.px_r.shape == (20, 3) and torch.equal(m.px_r[:, :2], r.px_r)
    totals = np.asarray(query.X.sum(axis=1)).ravel()
    means, variances = init_library_size(totals, np.full(len(totals), 2), 3)
    assert torch.equal(m.library_log_means[:, :2], r.library_log_means)
    assert m.library_log_means[0, 2] == torch.tensor(means[0, 2], dtype=torch.float32)
    assert m.library_log_vars[0, 2] == torch.tensor(variances[0, 2], dtype=torch.float32)
    assert all(p.requires_grad for p in m.l_encoder.parameters())
    assert not m.px_r.requires_grad and not m.px_dropout_decoder.weight_t.requires_grad
    before = {k: v.clone() for k, v in m.l_encoder.state_dict().items()}
    q.train(max_epochs=1, device="cpu", progress_bar=False)
    assert any(not torch.equal(before[k], v) for k, v in m.l_encoder.state_dict().items())
