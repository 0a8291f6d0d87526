"""Shared test helpers: fixture loading and CSR minibatches built from dense arrays."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
#: ``../shared/data`` beside the repository (``SCVI_FAST_SHARED_DATA`` names another folder)
SHARED_DATA = Path(os.environ.get("SCVI_FAST_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """A file of ../shared/data, skipping the test cleanly when the folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared/data is only beside the repository)")
    return path


def load_fixture(name: str) -> tuple[dict, dict]:
    """``(arrays, config)`` of ``tests/fixtures/scvi_<name>.npz`` (no pickle)."""
    z = np.load(FIXTURES / f"scvi_{name}.npz", allow_pickle=False)
    arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(str(arrays.pop("config_json")))


def csr_batch(x: np.ndarray | torch.Tensor, batch=None, dtype=torch.float32) -> SimpleNamespace:
    """A CSR minibatch (the fields the module reads) from a dense count matrix."""
    x = torch.as_tensor(np.asarray(x), dtype=dtype)
    xs = x.to_sparse_csr()
    n = x.shape[0]
    return SimpleNamespace(
        indptr=xs.crow_indices().to(torch.int64),
        indices=xs.col_indices().to(torch.int64),
        values=xs.values(),
        library=x.sum(1),
        batch=torch.zeros(n, dtype=torch.int64) if batch is None else torch.as_tensor(np.asarray(batch), dtype=torch.int64),
        labels=torch.zeros(n, dtype=torch.int64),
        n_genes=x.shape[1],
    )


def module_from_fixture(name: str, impl: str = "torch", dtype=torch.float32):
    """A scvi_fast VAE holding the weights of an scvi-tools fixture model, in eval mode."""
    from scvi_fast.compat import scvi_tools_state_to_module
    from scvi_fast.module import VAE

    arrays, cfg = load_fixture(name)
    state = {k[len("state/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("state/")}
    options = {k: cfg.get(k, d) for k, d in (("gene_likelihood", "nb"), ("dispersion", "gene"),
                                            ("latent_distribution", "normal"),
                                            ("use_observed_lib_size", True))}
    mod_state, passthrough, arch = scvi_tools_state_to_module(
        state, options["gene_likelihood"], options["dispersion"], options["use_observed_lib_size"])
    vae = VAE(
        arch["n_input"], n_batch=arch["n_batch"], n_labels=cfg.get("n_labels", 0),
        n_hidden=arch["n_hidden"], n_latent=arch["n_latent"], n_layers=arch["n_layers"],
        dropout_rate=cfg["dropout_rate"], impl=impl,
        library_log_means=mod_state.get("library_log_means"),
        library_log_vars=mod_state.get("library_log_vars"), **options,
    )
    vae.load_state_dict(mod_state)
    return vae.to(dtype).eval(), arrays, cfg, passthrough


def model_loss_and_grads(name: str, impl: str, dtype, n_cells: int, device="cpu",
                         train: bool = False, extra_weight: bool = True) -> dict:
    """Loss, per-cell reconstruction loss and KL, and every parameter gradient of a fixture
    model on its first ``n_cells`` cells, with the fixture's noise.

    ``train``: training-mode BatchNorm, with dropout off (back-ends draw different masks);
    else eval mode. ``extra_weight``: a non-uniform weight per cell on top of the mean loss,
    so that every row's gradient differs (the training case is uniform).
    """
    vae, arrays, _, _ = module_from_fixture(name, impl=impl, dtype=dtype)
    vae = vae.to(device).train(train)
    for block in vae.encoder.blocks:
        block.dropout_rate = 0.0
    x = csr_batch(arrays["x"][:n_cells], arrays["batch_index"][:n_cells], dtype=dtype)
    for k in ("indptr", "indices", "values", "library", "batch", "labels"):
        setattr(x, k, getattr(x, k).to(device))
    eps = torch.from_numpy(arrays["eps"][:n_cells]).to(device, dtype)
    _, _, out = vae(x, kl_weight=0.7, eps_noise=eps)
    total = out.loss
    if extra_weight:
        w = torch.linspace(0.5, 1.5, n_cells, dtype=dtype, device=device)
        total = total + (w * out.reconstruction_loss).sum() / n_cells
    named = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    result = {"loss": total.detach().reshape(1), "rec": out.reconstruction_loss.detach(),
              "kl": out.kl_local.detach()}
    result.update({n: g for (n, _), g in zip(named, grads) if g is not None})
    return result


def assert_model_accurate(got: dict, want64: dict, want32: dict | None = None) -> None:
    """Every entry of ``got`` (from :func:`model_loss_and_grads`) within the tolerance table's
    ``model`` entry of the float64 reference ``want64``; float32 results are judged against
    torch's own float32 error ``want32``. Norm-wise against ``max(max|t|, floor)``, the floor
    ``1e-6`` of the largest value of any entry (the biases right before a BatchNorm have an
    exact gradient of 0: rounding noise of ~1e-17 in every back-end)."""
    from scvi_fast.reference._accuracy import assert_accurate

    assert got.keys() == want64.keys()
    floor = 1e-6 * max(t.abs().max().item() for t in want64.values())
    for k, t in want64.items():
        scale = max(t.abs().max().item(), floor)
        low = None if want32 is None else want32[k]
        assert_accurate("model", got[k], t, k, low=low, scale=scale)
