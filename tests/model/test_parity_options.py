"""scvi-tools parity of every model option: gene likelihood (ZINB, NB, Poisson) x dispersion
(gene, gene-batch, gene-label, gene-cell) x latent distribution (normal, ln) x library
(observed, encoder), from ``tests/fixtures/scvi_options.npz`` (scvi-tools 1.4.2 in float64,
fixed weights and noise; see ``tests/fixtures/README.md``)."""

from __future__ import annotations

import json
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvi_fast
from scvi_fast.compat import safe_load_checkpoint, scvi_tools_state_to_module
from scvi_fast.module import VAE
from tests.helpers import FIXTURES, csr_batch

#: float64 on both sides, the same expressions up to the fused KL form and summation order:
#: the largest error seen over all 48 option sets is 3.4e-15 of the largest magnitude (the
#: reconstruction loss); 1e-12 leaves room for another BLAS's summation order and is far
#: below what any wrong term would move (1e-3 or more)
RTOL = 1e-12

_Z = np.load(FIXTURES / "scvi_options.npz", allow_pickle=False)
CONFIG = json.loads(str(_Z["config_json"]))
NAMES = sorted(CONFIG["options"])


def _arrays(prefix: str) -> dict:
    return {k[len(prefix):]: _Z[k] for k in _Z.files if k.startswith(prefix)}


def _module(name: str) -> VAE:
    opts = {k: v for k, v in CONFIG["options"][name].items() if k != "state_keys"}
    state = {k: torch.from_numpy(v) for k, v in _arrays(f"{name}/state/").items()}
    mod_state, _, arch = scvi_tools_state_to_module(
        state, opts["gene_likelihood"], opts["dispersion"], opts["use_observed_lib_size"])
    r = CONFIG["recipe"]
    vae = VAE(arch["n_input"], n_batch=arch["n_batch"], n_labels=len(CONFIG["labels_categories"]),
              n_hidden=r["n_hidden"], n_latent=r["n_latent"], n_layers=r["n_layers"],
              library_log_means=mod_state.get("library_log_means"),
              library_log_vars=mod_state.get("library_log_vars"), impl="torch", **opts)
    vae.load_state_dict(mod_state)
    return vae.double().eval()


def _close(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    got = got.detach().double().numpy().reshape(want.shape)
    scale = max(float(np.abs(want).max()), 1e-300)
    err = float(np.abs(got - want).max()) / scale
    assert err <= RTOL, f"{what}: max error {err:.3g} of the largest value (tolerance {RTOL})"


@pytest.mark.parametrize("name", NAMES)
def test_module_outputs_match_scvi_tools(name):
    """q_m, q_v, z (transformed for ln), the library (and its posterior), px (scale, rate,
    theta, zero-inflation logits), the reconstruction loss, KL of z and of l, and the loss at
    kl_weight 0.7 (scvi-tools anneals only the KL of z)."""
    want = {k: v for k, v in _arrays(f"{name}/").items() if not k.startswith("state/")}
    vae = _module(name)
    idx = _Z["eval_index"]
    x = csr_batch(_Z["x_all"][idx], _Z["batch_all"][idx], dtype=torch.float64)
    x.labels = torch.from_numpy(_Z["labels_all"][idx])
    with torch.no_grad():
        inf = vae.inference(x, eps_noise=torch.from_numpy(_Z["eps"]),
                            eps_library=torch.from_numpy(_Z["eps_l"]).reshape(-1))
        gen = vae.generative(inf["z"], x.batch, logits=True, labels=x.labels)
        out = vae.loss(x, inf, gen, kl_weight=CONFIG["recipe"]["kl_weight"])
    scale = vae.px_scale(gen["logits"])
    got = {"q_m": inf["q_m"], "q_v": inf["q_v"], "z": inf["z"], "library": inf["library"],
           "px_scale": scale, "px_rate": torch.exp(inf["library"]).unsqueeze(-1) * scale,
           "reconst_loss": out.reconstruction_loss, "kl_z": out.kl_z,
           "kl_l": out.kl_l if out.kl_l is not None else torch.zeros_like(out.kl_z),
           "loss": out.loss}
    if "px_r" in want:
        got["px_r"] = torch.exp(gen["px_r"]).expand_as(scale)
    if "px_dropout" in want:
        got["px_dropout"] = gen["px_dropout"]
    if "ql_m" in want:
        got["ql_m"], got["ql_v"] = inf["ql_m"], inf["ql_v"]
    assert set(got) == set(want)
    for k, v in want.items():
        _close(got[k], v, f"{name} {k}")
    np.testing.assert_allclose(out.kl_local.numpy(), want["kl_z"] + want["kl_l"], rtol=1e-12)


def _adata() -> anndata.AnnData:
    obs = pd.DataFrame({
        "donor": pd.Categorical.from_codes(_Z["batch_all"], CONFIG["batch_categories"]),
        "cell_type": pd.Categorical.from_codes(_Z["labels_all"], CONFIG["labels_categories"]),
    }, index=[f"c{i}" for i in range(len(_Z["batch_all"]))])
    ad = anndata.AnnData(sp.csr_matrix(_Z["x_all"]), obs=obs,
                         var=pd.DataFrame(index=CONFIG["gene_names"]))
    scvi_fast.SCVI.setup_anndata(ad, batch_key="donor", labels_key="cell_type")
    return ad


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("_lenc")][:2])
def test_library_prior_is_computed_as_scvi_tools(name):
    """``SCVI(adata, use_observed_lib_size=False)`` computes scvi-tools' ``library_log_means``
    and ``library_log_vars`` from the data (float32, bit for bit), and builds the parameter
    shapes and names scvi-tools has."""
    opts = {k: v for k, v in CONFIG["options"][name].items() if k != "state_keys"}
    r = CONFIG["recipe"]
    model = scvi_fast.SCVI(_adata(), n_hidden=r["n_hidden"], n_latent=r["n_latent"],
                           n_layers=r["n_layers"], **opts)
    want = _arrays(f"{name}/state/")
    for k in ("library_log_means", "library_log_vars"):
        assert torch.equal(getattr(model.module, k), torch.from_numpy(want[k])), k
    state = scvi_fast.compat.scvi_tools_state(model)
    assert list(state) == CONFIG["options"][name]["state_keys"]
    for k, v in state.items():
        assert tuple(v.shape) == want[k].shape, k


@pytest.mark.parametrize("folder", sorted(CONFIG["model_pt"].items()), ids=lambda f: f[0])
def test_scvi_tools_folders_round_trip_bit_for_bit(tmp_path, folder):
    """Each option set's scvi-tools folder loads (its options read from ``init_params_``) and
    exports back with every tensor, key order and constructor option unchanged."""
    name, rel = folder
    src = FIXTURES / rel
    model = scvi_fast.SCVI.load(src.parent, adata=_adata())
    opts = {k: v for k, v in CONFIG["options"][name].items() if k != "state_keys"}
    assert {k: model.init_params_[k] for k in opts} == opts
    model.save(tmp_path / "out", format="scvi-tools")
    ref = safe_load_checkpoint(src)
    got = safe_load_checkpoint(tmp_path / "out" / "model.pt")
    ref_state = {k: v for k, v in ref["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    got_state = {k: v for k, v in got["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    assert list(got_state) == list(ref_state)
    for k, v in ref_state.items():
        assert v.dtype == got_state[k].dtype and torch.equal(v, got_state[k]), k
    flat = got["attr_dict"]["init_params_"]["non_kwargs"]
    assert {k: flat[k] for k in opts} == opts
    # the loaded model reproduces the fixture's posterior means (float32 module)
    idx = _Z["eval_index"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_m = model.get_latent_representation(indices=idx, give_mean=True, return_dist=True)[0]
    np.testing.assert_allclose(q_m, _Z[f"{name}/q_m"], rtol=1e-4, atol=1e-5)
