"""The typed registry: one coder of categories for AnnData and stores, every saved dict read."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import scvi_fast
from scvi_fast.data import CSRStore, synthetic_anndata
from scvi_fast.model import SETUP_KEY, Registry


@pytest.fixture()
def adata():
    ad = synthetic_anndata(n_cells=120, n_genes=200, n_batches=3, n_cell_types=4, seed=5)
    ad = ad[np.asarray(ad.X.sum(1)).ravel() > 0].copy()
    # a categorical column with a category no cell has, in a non-sorted order
    ad.obs["batch"] = pd.Categorical(ad.obs["batch"].astype(str),
                                     categories=["batch_2", "unused", "batch_0", "batch_1"])
    ad.obs["cell_type"] = ad.obs["cell_type"].astype(str)  # plain strings: sorted categories
    return ad


def test_store_and_anndata_of_the_same_cells_have_the_same_registry(adata, tmp_path):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    from_adata = Registry.from_anndata(adata)
    store = CSRStore.create(tmp_path / "s", adata, batch_key="batch", labels_key="cell_type")
    from_store = Registry.from_store(store)
    assert from_adata.batch_categories == ("batch_2", "batch_0", "batch_1")  # unused dropped
    assert from_adata.labels_categories == tuple(sorted(set(adata.obs["cell_type"])))
    assert from_store == from_adata
    # and the cells get the same codes either way
    np.testing.assert_array_equal(from_adata.codes_of(adata, "batch"),
                                  from_adata.codes_of(store, "batch"))
    np.testing.assert_array_equal(from_adata.codes_of(adata, "labels"),
                                  from_adata.codes_of(store, "labels"))


def test_unknown_labels_raise_for_a_store_as_for_an_anndata(adata, tmp_path):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = scvi_fast.SCVI(adata, n_hidden=8, n_latent=2, impl="torch")
    other = adata.copy()
    other.obs["cell_type"] = other.obs["cell_type"].replace({"type_0": "new_type"})
    store = CSRStore.create(tmp_path / "s", other, batch_key="batch", labels_key="cell_type")
    for data in (other, store):
        with pytest.raises(ValueError, match=r"not trained on: \['new_type'\]"):
            model.get_latent_representation(data)
    # unknown batches too, and a missing batch column is an error; missing labels are not
    other = adata.copy()
    other.obs["batch"] = other.obs["batch"].astype(str).replace({"batch_0": "batch_9"})
    with pytest.raises(ValueError, match=r"not trained on: \['batch_9'\]"):
        model.get_latent_representation(other)
    no_batch = adata.copy()
    del no_batch.obs["batch"]
    with pytest.raises(KeyError, match="batch_key='batch'"):
        model.get_latent_representation(no_batch)
    no_labels = adata.copy()
    del no_labels.obs["cell_type"]
    assert model.get_latent_representation(no_labels).shape == (adata.n_obs, 2)


def test_codes_for_matches_by_name(adata):
    reg = Registry(var_names=("a",), batch_key="b", batch_categories=("10", "2", "x"))
    np.testing.assert_array_equal(reg.codes_for(["x", 10, "2", "x"], "batch"), [2, 0, 1, 2])
    np.testing.assert_array_equal(reg.codes_for(["x", "new"], "batch", unknown="missing"), [2, -1])
    with pytest.raises(ValueError, match="not trained on"):
        reg.codes_for(["new"], "batch")
    with pytest.raises(ValueError, match="'batch' or 'labels'"):
        reg.codes_for(["x"], "donor")


def test_every_saved_registry_dict_is_read():
    full = Registry(var_names=("g1", "g2"), batch_key="donor", batch_categories=("d1", "d2"),
                    layer="counts")
    assert Registry.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    # config.json "registry" as written before the covariate fields existed
    old = {"source": "anndata", "batch_key": "donor", "labels_key": "", "layer": "counts",
           "batch_categories": ["d1", "d2"], "labels_categories": ["0"], "var_names": ["g1", "g2"]}
    assert Registry.from_dict(old) == full
    # the scvi-tools import's (no labels key, numpy arrays)
    imported = {"batch_key": "", "labels_key": "", "layer": "",
                "batch_categories": np.array(["0"]), "labels_categories": ["0"],
                "var_names": np.array(["g1", "g2"], dtype=object)}
    reg = Registry.from_dict(imported)
    assert reg.batch_key is None and reg.layer is None and reg.n_batch == 1
    assert reg.var_names == ("g1", "g2") and reg.categorical_covariate_keys == ()
    assert reg.to_dict()["batch_key"] == "" and reg.to_dict()["categorical_covariate_keys"] == []


def test_setup_round_trips_through_uns(adata):
    scvi_fast.SCVI.setup_anndata(adata, batch_key="batch")
    reg = Registry.from_anndata(adata)
    assert reg.labels_key is None and reg.labels_categories == ("0",)
    assert set(adata.uns[SETUP_KEY]) == {"batch_key", "labels_key", "layer", "batch_categories",
                                        "labels_categories"}
    other = adata.copy()
    del other.uns[SETUP_KEY]
    reg.write_setup(other)
    assert Registry.from_anndata(other) == reg


def test_extended_by_appends_new_categories(adata):
    reg = Registry(var_names=tuple(adata.var_names), batch_key="batch",
                   batch_categories=("batch_0",), labels_key="cell_type",
                   labels_categories=("type_1",))
    ext = reg.extended_by(adata)
    assert ext.batch_categories == ("batch_0", "batch_2", "batch_1")
    assert ext.labels_categories[0] == "type_1" and len(ext.labels_categories) == 4
    assert ext.var_names == reg.var_names
