"""Reference mapping: prepare_query_anndata and load_query_data (frozen and unfrozen)."""

from __future__ import annotations

import logging

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvi_fast
from tests.helpers import csr_batch, shared_file

TRAIN = dict(max_epochs=2, batch_size=64, progress_bar=False, device="cpu", seed=0)


@pytest.fixture(scope="module")
def two_batches():
    adata = anndata.read_h5ad(shared_file("scvi_tests_pbmc_cite_2batch.h5ad"))
    totals = np.asarray(adata.X.sum(0)).ravel()
    adata = adata[:, np.sort(np.argsort(-totals)[:1500])].copy()  # small and fast
    first, second = adata.obs["batch"].cat.categories[:2]
    ref = adata[adata.obs["batch"] == first].copy()
    query = adata[adata.obs["batch"] == second].copy()
    ref.obs["batch"] = ref.obs["batch"].cat.remove_unused_categories()
    scvi_fast.SCVI.setup_anndata(ref, batch_key="batch")
    model = scvi_fast.SCVI(ref, n_hidden=32, n_latent=8, impl="torch")
    model.train(**TRAIN)
    return model, query


def test_query_training_with_default_flags(two_batches, caplog):
    ref, query = two_batches
    rng = np.random.default_rng(0)
    keep = rng.permutation(query.n_vars)[: query.n_vars - 30]
    q = query[:, keep].copy()  # genes shuffled, 30 missing
    with caplog.at_level(logging.INFO, logger="scvi_fast.model._query"):
        scvi_fast.SCVI.prepare_query_anndata(q, reference_model=ref)
    assert "Found 98.00% reference vars" in caplog.text
    assert list(q.var_names) == list(ref.var_names)
    missing = ~ref.var_names.isin(query.var_names[keep])
    assert sp.issparse(q.X) and q.X[:, np.flatnonzero(missing)].nnz == 0
    src_cols = pd.Index(query.var_names).get_indexer(ref.var_names[~missing])
    assert (q.X[:, np.flatnonzero(~missing)] != query.X[:, src_cols]).nnz == 0

    model = scvi_fast.SCVI.load_query_data(q, ref)  # positional reference, scvi-tools style
    assert not model.is_trained
    assert model.batch_categories == ref.batch_categories + [str(query.obs["batch"].iloc[0])]
    # embedding without fine-tuning: the encoder is the reference's
    x = csr_batch(q.X.toarray()[:40])
    with torch.no_grad():
        want = ref.module.eval().inference(x, give_mean=True)["q_m"].numpy()
    np.testing.assert_array_equal(model.get_latent_representation()[:40], want)

    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    assert set(before) == set(ref.module.state_dict()) | {
        f"decoder.linears.{i}.weight_cov" for i in range(model.module.n_layers)
    }
    model.train(**TRAIN)
    assert model.is_trained
    after = model.module.state_dict()
    assert list(after) == list(before)
    # frozen outright (no gradient, not in the optimiser) and BatchNorm statistics (eval mode)
    for key in ("encoder.mean.weight", "encoder.var.bias", "decoder.scale.weight", "px_r",
                "encoder.blocks.0.norm.weight", "encoder.blocks.0.norm.running_mean",
                "decoder.blocks.0.norm.running_var", "decoder.blocks.0.norm.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    # the reference's single category has a zero row; it gets no gradient (no reference cells)
    # and weight decay leaves zero at zero
    assert (after["decoder.linears.0.weight_cov"][0] == 0).all()
    # trained: the new batch row and the decoder's BatchNorm scale (freeze_batchnorm_decoder=False)
    for key in ("decoder.blocks.0.norm.weight",):
        assert not torch.equal(after[key], before[key]), key
    new_row = after["decoder.linears.0.weight_cov"][1] - before["decoder.linears.0.weight_cov"][1]
    assert new_row.abs().max() > 1e-4
    # hooked weights move by weight decay only (about 1e-7 of themselves per step)
    moved = (after["encoder.first.weight"] - before["encoder.first.weight"]).abs().max()
    assert 0 < moved < 1e-4 * before["encoder.first.weight"].abs().max()


def test_query_models_save_and_load_in_both_formats(two_batches, tmp_path):
    ref, query = two_batches
    q = query.copy()
    model = scvi_fast.SCVI.load_query_data(q, ref)
    model.save(tmp_path / "native")
    model.save(tmp_path / "st", format="scvi-tools")
    for folder in ("native", "st"):
        back = scvi_fast.SCVI.load(tmp_path / folder)
        assert back.batch_categories == model.batch_categories
        for k, v in model.module.state_dict().items():
            assert torch.equal(back.module.state_dict()[k], v), (folder, k)
    for folder in ("native", "st"):
        names = scvi_fast.SCVI.prepare_query_anndata(q, tmp_path / folder, return_reference_var_names=True)
        assert list(names) == list(ref.var_names)
    # a reference given as a folder works too (scvi_fast's keyword spelling as well)
    again = scvi_fast.SCVI.load_query_data(query.copy(), reference=tmp_path / "st")
    assert again.batch_categories == model.batch_categories  # no new categories this time
    assert torch.equal(again.module.state_dict()["decoder.linears.0.weight_cov"],
                       model.module.state_dict()["decoder.linears.0.weight_cov"])


def test_unfrozen_query_trains_everything(two_batches):
    ref, query = two_batches
    with pytest.warns(FutureWarning, match="unfrozen"):
        old_spelling = scvi_fast.SCVI.load_query_data(query.copy(), ref, freeze=False)
    assert old_spelling.query_flags_["unfrozen"]
    model = scvi_fast.SCVI.load_query_data(query.copy(), reference_model=ref, unfrozen=True)
    assert all(p.requires_grad for p in model.module.parameters())
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(**TRAIN)
    after = model.module.state_dict()
    for key in ("encoder.first.weight", "decoder.scale.weight", "decoder.linears.0.weight_cov",
                "px_r", "encoder.blocks.0.norm.weight"):
        assert not torch.equal(after[key], before[key]), key
    # as scvi-tools 1.4.2, the query trains in eval mode: running statistics stay
    assert torch.equal(after["encoder.blocks.0.norm.running_mean"],
                       before["encoder.blocks.0.norm.running_mean"])
    with pytest.raises(TypeError, match="not both"):
        scvi_fast.SCVI.load_query_data(query.copy(), reference_model=ref, reference=object())
    with pytest.raises(ValueError, match="missing from the reference"):
        scvi_fast.SCVI.load_query_data(query.copy(), ref, transfer_batch=False)


def test_prepare_query_anndata_dense_layers_and_refusals(two_batches):
    ref, _ = two_batches
    genes = list(ref.var_names)
    X = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    q = anndata.AnnData(X=X, var=pd.DataFrame(index=[genes[3], "other", genes[0], genes[1]]))
    q.layers["counts"] = X.copy()
    with pytest.warns(UserWarning, match="less than 80%"):
        out = scvi_fast.SCVI.prepare_query_anndata(q, ref, inplace=False)
    assert out is not q and q.shape == (3, 4)
    assert list(out.var_names) == genes
    np.testing.assert_array_equal(out.X[:, 0], X[:, 2])
    np.testing.assert_array_equal(out.X[:, 3], X[:, 0])
    np.testing.assert_array_equal(out.layers["counts"][:, 1], X[:, 3])
    assert out.X[:, 2].sum() == 0 and out.X[:, 4:].sum() == 0
    assert list(scvi_fast.SCVI.prepare_query_anndata(q, ref, return_reference_var_names=True)) == genes
    with pytest.warns(UserWarning, match="less than 80%"):
        scvi_fast.SCVI.prepare_query_anndata(q, ref)
    assert q.shape == (3, len(genes))
    with pytest.raises(ValueError, match="No reference var names"):
        scvi_fast.SCVI.prepare_query_anndata(anndata.AnnData(X=X, var=pd.DataFrame(index=list("abcd"))), ref)
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        scvi_fast.SCVI.load_query_data(anndata.AnnData(X=X, var=pd.DataFrame(index=list("abcd"))), ref)
