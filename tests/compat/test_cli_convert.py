"""``scvi-fast convert`` between model formats and ``scvi-fast embed`` with an scvi-tools folder."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import torch

from scvi_fast.cli import main
from scvi_fast.compat import safe_load_checkpoint
from scvi_fast.data import write_h5ad
from tests.helpers import FIXTURES, load_fixture

FOLDER = FIXTURES / "scvi_tools_models" / "default"


def test_convert_model_both_ways_is_exact(tmp_path, capsys):
    assert main(["convert", str(FOLDER), "--out", str(tmp_path / "native")]) == 0
    assert (tmp_path / "native" / "model.safetensors").exists()
    assert main(["convert", str(tmp_path / "native"), "--out", str(tmp_path / "back"), "--to", "scvi-tools"]) == 0
    a = safe_load_checkpoint(FOLDER / "model.pt")["model_state_dict"]
    b = safe_load_checkpoint(tmp_path / "back" / "model.pt")["model_state_dict"]
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
    assert main(["convert", str(tmp_path / "native"), "--out", str(tmp_path / "back")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "native"), "--out", str(tmp_path / "back"), "--overwrite"]) == 0


def test_convert_refuses_to_with_data(tmp_path, capsys):
    adata = anndata.AnnData(np.ones((3, 2), np.float32))
    write_h5ad(adata, tmp_path / "a.h5ad")
    assert main(["convert", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "s"), "--to", "scvi_fast"]) == 2
    assert "model folders" in capsys.readouterr().err


def test_embed_with_an_scvi_tools_folder(tmp_path):
    arrays, cfg = load_fixture("default")
    obs = pd.DataFrame({"donor": np.asarray(cfg["batch_categories"])[arrays["batch_index"]]},
                       index=[str(s) for s in arrays["obs_names"]])
    adata = anndata.AnnData(arrays["x"].astype(np.float32), obs=obs, var=pd.DataFrame(index=cfg["gene_names"]))
    write_h5ad(adata, tmp_path / "q.h5ad")
    assert main(["embed", str(FOLDER), str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "z.h5ad"), "--device", "cpu"]) == 0
    latent = anndata.read_h5ad(tmp_path / "z.h5ad").obsm["X_scVI"]
    np.testing.assert_allclose(latent, arrays["latent_mean"], rtol=2e-5, atol=2e-6)
