"""``write_h5ad`` with pandas 3's string dtype (``future.infer_string`` under pandas 2)."""

import contextlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_fast.data import write_h5ad


def _string_dtype_strings():
    """pandas 3 infers ``str`` (a ``pd.StringDtype``) for strings; pandas 2.1+ does so under
    ``future.infer_string``."""
    if int(pd.__version__.split(".")[0]) >= 3:
        return contextlib.nullcontext()
    try:
        pd.get_option("future.infer_string")
    except (KeyError, pd.errors.OptionError):
        pytest.skip(f"pandas {pd.__version__} has no string dtype inference to write")
    return pd.option_context("future.infer_string", True)


def _adata(rng):
    n, g = 37, 19
    X = sp.random(n, g, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.ceil(X.data * 9)
    obs = pd.DataFrame({"batch": pd.Categorical(rng.choice(["a", "b", "c"], n)),
                        "donor": rng.choice(["d1", "d2"], n),
                        "umis": rng.integers(1, 100, n)},
                       index=[f"cell_{i}" for i in range(n)])
    var = pd.DataFrame({"symbol": [f"SYM{i}" for i in range(g)]},
                       index=[f"gene_{i}" for i in range(g)])
    return ad.AnnData(X=X, obs=obs, var=var)


def test_string_dtype_index_and_columns_round_trip(tmp_path):
    rng = np.random.default_rng()
    with _string_dtype_strings():
        a = _adata(rng)
        assert isinstance(a.obs_names.dtype, pd.StringDtype)
        assert isinstance(a.obs["donor"].dtype, pd.StringDtype)
        setting = getattr(ad.settings, "allow_write_nullable_strings", None)
        if setting is False:  # the failure this helper exists for
            with pytest.raises(RuntimeError, match="allow_write_nullable_strings"):
                a.write_h5ad(tmp_path / "plain.h5ad")
        write_h5ad(a, tmp_path / "a.h5ad")
        if setting is not None:
            assert ad.settings.allow_write_nullable_strings == setting  # restored
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    assert list(b.obs_names) == list(a.obs_names)
    assert list(b.var_names) == list(a.var_names)
    assert list(b.obs["donor"]) == list(a.obs["donor"])
    assert list(b.var["symbol"]) == list(a.var["symbol"])
    assert b.obs["batch"].dtype == "category"
    assert list(b.obs["batch"]) == list(a.obs["batch"])
    np.testing.assert_array_equal(b.obs["umis"].to_numpy(), a.obs["umis"].to_numpy())
    assert (b.X != a.X).nnz == 0


def test_object_strings_write_as_before(tmp_path):
    rng = np.random.default_rng()
    a = _adata(rng)
    a.obs.index = a.obs.index.astype(object)
    a.obs["donor"] = a.obs["donor"].astype(object)
    write_h5ad(a, tmp_path / "a.h5ad", compression="gzip")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    assert list(b.obs_names) == list(a.obs_names)
    assert list(b.obs["donor"]) == list(a.obs["donor"])
    assert (b.X != a.X).nnz == 0
