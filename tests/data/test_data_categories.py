"""One category coder: columns to codes and values onto known categories, for every input."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_fast.data import (ArraySource, CSRStore, as_source, categorize, codes_for,
                            highly_variable_genes)
from _data_helpers import random_counts


def _cells(rng, n=300, n_genes=40):
    """Counts with a categorical batch column holding an unused category (listed first, so the
    codes shift when it is dropped) and a plain string label column."""
    X = random_counts(rng, n, n_genes, density=0.3)
    X = X[np.asarray(X.sum(axis=1)).ravel() > 0]
    n = X.shape[0]
    batch = pd.Categorical(rng.choice(["b2", "b0", "b1"], n),
                           categories=["unused", "b2", "b0", "b1"])  # not sorted, on purpose
    labels = rng.choice(["T cell", "B cell", "NK", "Mono"], n).astype(object)
    obs = pd.DataFrame({"batch": batch, "cell_type": labels},
                       index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)


def test_categorical_keeps_order_and_drops_unused():
    values = pd.Series(pd.Categorical(["z", "a", "z", "m"], categories=["z", "q", "m", "a"]))
    codes, cats = categorize(values, "batch")
    assert cats == ["z", "m", "a"]  # "q" dropped, order kept (not sorted)
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, [0, 2, 0, 1])
    np.testing.assert_array_equal(np.asarray(cats)[codes], values.astype(str))


@pytest.mark.parametrize("values, cats, codes", [
    (["b", "a", "c", "a"], ["a", "b", "c"], [1, 0, 2, 0]),  # strings: sorted
    ([10, 2, 1, 2], ["1", "2", "10"], [2, 1, 0, 1]),  # numbers: sorted as numbers, then str
    (np.array([True, False]), ["False", "True"], [1, 0]),
    ([], [], []),
])
def test_other_dtypes_become_sorted_categories(values, cats, codes):
    got_codes, got_cats = categorize(values, "k")
    assert got_cats == cats
    np.testing.assert_array_equal(got_codes, np.asarray(codes, dtype=np.int64))
    assert got_codes.dtype == np.int64


@pytest.mark.parametrize("values", [
    pd.Series(["a", None, "b"]),
    pd.Series([1.0, np.nan, 2.0]),
    pd.Series(pd.Categorical(["a", None, "a"])),
])
def test_missing_values_are_an_error_naming_the_column_and_fix(values):
    with pytest.raises(ValueError, match=r"obs\['donor'\] has 1 missing values \(first at cell "
                                         r"1\).*fillna"):
        categorize(values, "donor")


def test_categories_equal_as_text_are_an_error():
    with pytest.raises(ValueError, match="read the same as text"):
        categorize(pd.Series([1, "1", 2], dtype=object), "batch")


def test_codes_for_maps_by_name_whatever_the_column_order():
    known = ["b0", "b1", "b2"]
    values = pd.Series(pd.Categorical(["b2", "b0", "b2"], categories=["b2", "x", "b0"]))
    # "x" is unused: ignored though unknown
    np.testing.assert_array_equal(codes_for(values, known, "batch"), [2, 0, 2])
    np.testing.assert_array_equal(codes_for(np.array([1, 0, 1]), ["0", "1"], "k"), [1, 0, 1])
    assert codes_for([], known, "batch").dtype == np.int64


def test_unknown_values_raise_naming_ten_of_them_and_the_known_ones():
    known = [f"k{i:02d}" for i in range(12)]
    values = [f"new{i:02d}" for i in range(11)] + ["k03"]
    with pytest.raises(ValueError) as err:
        codes_for(values, known, "batch")
    msg = str(err.value)
    assert "obs['batch'] has 11 categories the model was not trained on" in msg
    assert "'new09'" in msg and "'new10'" not in msg  # ten shown, then " ..."
    assert "Known (12)" in msg and "'k09'" in msg and "'k10'" not in msg
    assert "load_query_data" in msg


def test_unknown_missing_gives_minus_one():
    got = codes_for(["a", "zz", "b", "zz"], ["a", "b"], "labels", unknown="missing")
    np.testing.assert_array_equal(got, [0, -1, 1, -1])
    with pytest.raises(ValueError, match="unknown must be"):
        codes_for(["a"], ["a"], "labels", unknown="zero")
    with pytest.raises(ValueError, match="repeat a name"):
        codes_for(["a"], ["a", "a"], "labels")


@pytest.mark.parametrize("route", ["memory", "h5ad", "backed", "store_of_store"])
def test_store_and_anndata_get_the_same_categories_and_codes(rng, tmp_path, route):
    adata = _cells(rng)
    b_codes, b_cats = categorize(adata.obs["batch"], "batch")
    l_codes, l_cats = categorize(adata.obs["cell_type"], "cell_type")
    assert b_cats == ["b2", "b0", "b1"] and l_cats == ["B cell", "Mono", "NK", "T cell"]
    if route == "memory":
        source = adata
    else:
        adata.write_h5ad(tmp_path / "a.h5ad")
        source = (ad.read_h5ad(tmp_path / "a.h5ad", backed="r") if route == "backed"
                  else tmp_path / "a.h5ad")
    src = as_source(source, batch_key="batch", labels_key="cell_type")
    store = CSRStore.create(tmp_path / "s", source, batch_key="batch", labels_key="cell_type",
                            chunk_size=64)
    if route == "store_of_store":
        store = CSRStore.create(tmp_path / "s2", store, shuffle=True, seed=1)
        order = store.source_rows
    else:
        order = np.arange(adata.n_obs)
    for got_cats, got_codes in ((src.batch_categories, src.batch_codes),
                                (store.batch_categories, store.batch_codes[np.argsort(order)])):
        assert got_cats == b_cats
        np.testing.assert_array_equal(got_codes, b_codes)
    assert src.labels_categories == store.labels_categories == l_cats
    np.testing.assert_array_equal(src.labels_codes, l_codes)
    np.testing.assert_array_equal(store.labels_codes[np.argsort(order)], l_codes)
    # the store hands back the column it came from, coded the same way again
    np.testing.assert_array_equal(
        categorize(store.obs_column("batch"), "batch")[0][np.argsort(order)], b_codes)


def test_unknown_labels_raise_for_a_store_as_for_an_anndata(rng, tmp_path):
    adata = _cells(rng)
    store = CSRStore.create(tmp_path / "s", adata, batch_key="batch", labels_key="cell_type")
    known = ["B cell", "NK", "T cell"]  # a model that never saw "Mono"
    errors = []
    for column in (adata.obs["cell_type"], store.obs_column("cell_type")):
        with pytest.raises(ValueError, match=r"1 categories the model was not trained on: "
                                             r"\['Mono'\]") as err:
            codes_for(column, known, "cell_type")
        errors.append(str(err.value))
    assert errors[0] == errors[1]
    # known labels get the same codes from both
    sub = adata.obs["cell_type"] != "Mono"
    rows = np.flatnonzero(sub.to_numpy())
    np.testing.assert_array_equal(codes_for(adata.obs["cell_type"][sub], known, "cell_type"),
                                  codes_for(store.obs_column("cell_type", rows), known,
                                            "cell_type"))


def test_obs_column(rng, tmp_path):
    adata = _cells(rng)
    store = CSRStore.create(tmp_path / "s", adata, batch_key="batch")
    col = store.obs_column("batch", rows=[3, 0])
    assert list(col.categories) == ["b2", "b0", "b1"]
    np.testing.assert_array_equal(np.asarray(col), adata.obs["batch"].astype(str).iloc[[3, 0]])
    with pytest.raises(KeyError, match="records the covariates 'batch' and None, not 'donor'"):
        store.obs_column("donor")
    # bare integer codes (no categories recorded) come back as their own categories
    X = random_counts(rng, 6, 5, density=1.0)
    bare = CSRStore.create(tmp_path / "b", as_source(X, batch_codes=[4, 4, 1, 1, 4, 1]),
                           batch_key="donor")
    assert bare.batch_categories is None
    np.testing.assert_array_equal(np.asarray(bare.obs_column("donor")), [4, 4, 1, 1, 4, 1])


def test_conversion_drops_unused_categories_a_source_brings(rng, tmp_path):
    X = random_counts(rng, 8, 5, density=1.0)
    src = ArraySource.from_matrix(X, batch_codes=[2, 2, 0, 0, 2, 0, 2, 2])
    src.batch_categories = ["x", "never", "y"]  # e.g. a store written before they were dropped
    store = CSRStore.create(tmp_path / "s", src, batch_key="donor")
    assert store.batch_categories == ["x", "y"]
    np.testing.assert_array_equal(store.batch_codes, [1, 1, 0, 0, 1, 0, 1, 1])


def test_hvg_batches_are_the_same_from_a_store_and_an_anndata(rng, tmp_path):
    adata = _cells(rng, n=400, n_genes=60)
    store = CSRStore.create(tmp_path / "s", adata, batch_key="batch", check=False)
    a = highly_variable_genes(store, 20, batch_key="batch", loess="direct")
    b = highly_variable_genes(adata, 20, batch_key="batch", loess="direct")
    pd.testing.assert_frame_equal(a, b)
