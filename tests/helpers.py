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
    mod_state, passthrough, arch = scvi_tools_state_to_module(state)
    vae = VAE(
        arch["n_input"], n_batch=arch["n_batch"], n_hidden=arch["n_hidden"],
        n_latent=arch["n_latent"], n_layers=arch["n_layers"], dropout_rate=cfg["dropout_rate"], impl=impl,
    )
    vae.load_state_dict(mod_state)
    return vae.to(dtype).eval(), arrays, cfg, passthrough
