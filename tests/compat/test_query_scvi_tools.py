"""Query mapping against scvi-tools 1.4.2: which weights a query training moves, flag by flag.

``tests/fixtures/scvi_query.npz`` holds an scvi-tools reference (``query_ref/model.pt``) and, for
three sets of ``load_query_data`` flags, the module state before and after 2 epochs of query
training by scvi-tools. The same query is trained here from the same reference. Two trainings
in different frameworks are not bitwise alike, so what is compared is each tensor's (and each
batch row's) fate: bitwise unchanged, moved only by Adam's weight decay (a gradient hook
zeroes its gradient, but the optimiser holds it), or trained.

Weight decay alone moves a weight by about ``lr * weight_decay / eps = 1e-7`` of itself per
step (Adam with ``g = 1e-6 p``: ``m/sqrt(v) = sign(p)`` is damped by ``eps = 0.01``), so
after 16 steps by about 2e-6 of the block's largest value; a gradient moves it by about
``lr = 1e-3`` per step, at least 1e-3 of the block's scale over the run. The threshold 1e-4
between the two classes leaves a factor of 10 on either side.
"""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import torch

import scvi_fast
from scvi_fast.compat._state import scvi_tools_state_to_module
from tests.helpers import FIXTURES, load_fixture, shared_file

DECAY_ONLY = 1e-4  # relative change separating "weight decay only" from "trained" (see above)


@pytest.fixture(scope="module")
def query_case():
    arrays, cfg = load_fixture("query")
    r = cfg["recipe"]
    adata = anndata.read_h5ad(shared_file(r["file"]))
    totals = np.asarray(adata.X.sum(axis=0)).ravel()
    adata = adata[:, np.sort(np.argsort(-totals, kind="stable")[: r["n_genes"]])].copy()
    adata.obs["donor"] = adata.obs["donor"].astype(str)
    assert list(adata.var_names) == list(arrays["gene_names"])
    ref = adata[list(arrays["reference_obs_names"])].copy()
    query = adata[list(arrays["query_obs_names"])].copy()
    return arrays, cfg, ref, query


def _fast_state(arrays, run: str, when: str) -> dict[str, torch.Tensor]:
    prefix = f"{run}/{when}/"
    state = {k[len(prefix):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}
    module_state, _, _ = scvi_tools_state_to_module(state)
    return module_state


def _fate(before: torch.Tensor, after: torch.Tensor) -> str:
    if torch.equal(before, after):
        return "same"
    scale = before.double().abs().max().clamp_min(1e-12)
    return "decay" if (after.double() - before.double()).abs().max() / scale < DECAY_ONLY else "trained"


def _fates(before: dict, after: dict, categories: list[str]) -> dict[str, str]:
    out = {}
    for key, b in before.items():
        a = after[key]
        if key.endswith("weight_cov"):  # one fate per batch category
            for i, cat in enumerate(categories):
                out[f"{key}[{cat}]"] = _fate(b[i], a[i])
        elif b.is_floating_point():
            out[key] = _fate(b, a)
        else:
            out[key] = "same" if torch.equal(b, a) else "changed"  # num_batches_tracked
    return out


@pytest.mark.parametrize("run", ["default", "unfrozen", "flipped"])
def test_query_training_moves_what_scvi_tools_moves(query_case, run):
    arrays, cfg, ref, query = query_case
    info = cfg["runs"][run]
    reference = scvi_fast.SCVI.load(FIXTURES / "scvi_tools_models" / "query_ref", adata=ref,
                                    accelerator="cpu")
    model = scvi_fast.SCVI.load_query_data(query.copy(), reference_model=reference,
                                           accelerator="cpu", **info["flags"])
    assert model.batch_categories == info["batch_categories"]
    # the starting point is the reference's (new batch rows aside)
    want_before = _fast_state(arrays, run, "before")
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    for key, value in want_before.items():
        if key.endswith("weight_cov"):
            torch.testing.assert_close(before[key][:3], value[:3], rtol=0, atol=0)
        else:
            torch.testing.assert_close(before[key], value, rtol=0, atol=0)
    model.train(max_epochs=cfg["recipe"]["query_epochs"], batch_size=cfg["recipe"]["batch_size"],
                accelerator="cpu", enable_progress_bar=False, seed=0)
    after = model.module.state_dict()
    ours = _fates(before, after, model.batch_categories)
    theirs = _fates(want_before, _fast_state(arrays, run, "after"), info["batch_categories"])
    assert ours == theirs
    # scvi-tools' query trains in eval mode: BatchNorm statistics never move, whatever the flags
    assert all(v == "same" for k, v in theirs.items() if "running" in k or "num_batches" in k)


def test_query_flags_set_what_scvi_tools_sets(query_case):
    """requires_grad per tensor, BatchNorm momentum and dropout, as scvi-tools' online-update
    setup leaves them (read from the fixture)."""
    arrays, cfg, ref, query = query_case
    reference = scvi_fast.SCVI.load(FIXTURES / "scvi_tools_models" / "query_ref", adata=ref,
                                    accelerator="cpu")
    for run, info in cfg["runs"].items():
        model = scvi_fast.SCVI.load_query_data(query.copy(), reference_model=reference,
                                               accelerator="cpu", **info["flags"])
        # scvi-tools' flags mapped onto scvi_fast's tensors through the checkpoint mapping
        state = {k: torch.full_like(torch.from_numpy(arrays[f"{run}/before/{k}"]).float(),
                                    float(info["requires_grad"].get(k, False)))
                 for k in (k[len(f"{run}/before/"):] for k in arrays if k.startswith(f"{run}/before/"))}
        want, _, _ = scvi_tools_state_to_module(state)
        params = dict(model.module.named_parameters())
        for key, flag in want.items():
            name = "decoder.scale.weight_t" if key == "decoder.scale.weight" else key
            if name in params:
                assert params[name].requires_grad == bool(flag.flatten()[0]), (run, key)
        momenta = [b.norm.momentum for b in model.module.encoder.blocks]
        momenta_dec = [b.norm.momentum for b in model.module.decoder.blocks]
        st = info["batchnorm_momentum"]
        assert momenta == [st[f"z_encoder.encoder.fc_layers.Layer {i}.1"] for i in range(2)], run
        assert momenta_dec == [st[f"decoder.px_decoder.fc_layers.Layer {i}.1"] for i in range(2)], run
        drop = [b.dropout_rate for b in model.module.encoder.blocks]
        assert drop == [info["dropout_p"][f"z_encoder.encoder.fc_layers.Layer {i}.4"]
                        for i in range(2)], run
        model.module.train()
        assert not any(m.training for m in model.module.modules()), run
