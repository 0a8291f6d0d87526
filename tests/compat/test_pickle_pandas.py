"""The restricted unpickler reads the pandas objects scvi-tools keeps (training history,
category mappings) as pandas 2 and pandas 3 write them, and nothing else.

pandas 3 pickles its public classes under their top-level names (``pandas.DataFrame``) where
pandas 2 wrote ``pandas.core.frame.DataFrame``, and its default string dtype is a
``StringArray`` (pyarrow-backed when pyarrow is installed). Protocol 2 (what ``torch.save``
writes) names a global as ``c<module>\\n<name>\\n``, so a pandas 2 pickle is turned into what
pandas 3 writes by renaming those lines; the whole suite also runs in a pandas 3 environment.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pandas as pd
import pytest

from scvi_fast.compat._pickle import RestrictedUnpickler, UnsafeCheckpointError

#: pandas 2 module paths -> the names pandas 3 writes
PANDAS3_NAMES = {
    b"pandas.core.frame\nDataFrame": b"pandas\nDataFrame",
    b"pandas.core.series\nSeries": b"pandas\nSeries",
    b"pandas.core.indexes.base\nIndex\n": b"pandas\nIndex\n",
    b"pandas.core.indexes.range\nRangeIndex": b"pandas\nRangeIndex",
    b"pandas.core.arrays.categorical\nCategorical": b"pandas\nCategorical",
    b"pandas.core.dtypes.dtypes\nCategoricalDtype": b"pandas\nCategoricalDtype",
    b"pandas.core.arrays.string_\nStringArray": b"pandas.arrays\nStringArray",
    b"pandas.core.arrays.string_\nStringDtype": b"pandas\nStringDtype",
    b"pandas._libs.missing\nNA": b"pandas\nNA",
}


def _history():
    """What scvi-tools keeps: per-metric DataFrames indexed by epoch, category mappings."""
    epochs = pd.Index(np.arange(3), name="epoch")
    return {
        "history": {"elbo_train": pd.DataFrame({"elbo_train": [3.0, 2.0, 1.5]}, index=epochs)},
        "series": pd.Series([1.0, 2.0]),
        "mapping": np.array(["b1", "b2"], dtype=object),
        "categorical": pd.Categorical(["a", "b", "a"]),
        "strings": pd.array(["x", None], dtype="string"),
        "string_index": pd.Index(["g1", "g2"], dtype="string"),
    }


def _load(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _check_equal(got, want):
    pd.testing.assert_frame_equal(got["history"]["elbo_train"], want["history"]["elbo_train"])
    pd.testing.assert_series_equal(got["series"], want["series"])
    np.testing.assert_array_equal(got["mapping"], want["mapping"])
    pd.testing.assert_extension_array_equal(got["categorical"], want["categorical"])
    pd.testing.assert_extension_array_equal(got["strings"], want["strings"])
    pd.testing.assert_index_equal(got["string_index"], want["string_index"])


def test_reads_what_this_pandas_writes():
    want = _history()
    _check_equal(_load(pickle.dumps(want, protocol=2)), want)


def test_reads_pandas3_top_level_names():
    want = _history()
    data = pickle.dumps(want, protocol=2)
    renamed = data
    for old, new in PANDAS3_NAMES.items():
        renamed = renamed.replace(old, new)
    if int(pd.__version__.split(".")[0]) < 3:
        assert renamed != data  # the renaming did happen: this pickle speaks pandas 3
    assert b"pandas\nDataFrame" in renamed
    _check_equal(_load(renamed), want)


def test_array_reconstructor_only_for_pandas_arrays():
    """``__pyx_unpickle_NDArrayBacked`` builds any class without its constructor: only the
    pandas arrays that need it are let through."""
    from pandas._libs.arrays import NDArrayBacked

    class Other(NDArrayBacked):
        pass

    from scvi_fast.compat._pickle import _unpickle_ndarray_backed

    with pytest.raises(UnsafeCheckpointError, match="Categorical and StringArray"):
        _unpickle_ndarray_backed(Other, 0, None)


def test_arrow_strings_are_validated():
    pa = pytest.importorskip("pyarrow")
    from scvi_fast.compat._pickle import allowed_globals

    restore = allowed_globals()[("pyarrow.lib", "_restore_array")]
    arr = pa.array(["a", "bc"])
    good = arr.__reduce__()[1][0]
    assert restore(good).equals(arr)
    # the same buffers claiming more rows than they hold
    typ, length, *rest = good
    with pytest.raises(pa.ArrowInvalid):
        restore((typ, length + 5, *rest))
