"""Exact comparison of the numba gather kernels against scipy row indexing."""

import numpy as np
import pytest
import scipy.sparse as sp

from scvi_fast.data import gather_rows
from _data_helpers import random_counts

SHAPES = [(300, 257), (37, 1999), (1, 1), (0, 40), (40, 0), (0, 0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("indptr_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("out_dtypes", [(None, None), (np.int32, np.float32)])
def test_gather_matches_scipy(rng, shape, indptr_dtype, out_dtypes):
    m = random_counts(rng, *shape, density=0.3, empty_rows=shape[0] // 5,
                      indptr_dtype=indptr_dtype)
    assert m.indptr.dtype == indptr_dtype
    n_out = 2 * shape[0] + 3 if shape[0] else 0
    rows = rng.integers(0, max(shape[0], 1), size=n_out) if shape[0] else np.zeros(0, np.int64)
    indptr, indices, data = gather_rows(m.indptr, m.indices, m.data, rows, *out_dtypes)
    ref = m[rows]
    assert indptr.dtype == np.int64
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)
    if out_dtypes[0] is not None:
        assert indices.dtype == np.int32 and data.dtype == np.float32


@pytest.mark.parametrize("src_dtypes", [(np.uint8, np.uint8), (np.uint16, np.uint16),
                                        (np.uint32, np.float32)])
def test_gather_compact_dtypes_into_preallocated_poisoned_buffers(rng, src_dtypes):
    m = random_counts(rng, 120, 200, density=0.25, max_count=200, empty_rows=7)
    ind, dat = m.indices.astype(src_dtypes[0]), m.data.astype(src_dtypes[1])
    rows = rng.permutation(120)[:90]
    ref = m[rows]
    cap = ref.nnz + 17
    out = (np.full(91, -7, np.int64), np.full(cap, -1, np.int32), np.full(cap, np.nan, np.float32))
    lib = np.full(90, np.nan, np.float32)
    indptr, indices, data = gather_rows(m.indptr, ind, dat, rows, out=out, out_sum=lib)
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)
    np.testing.assert_array_equal(lib, np.asarray(ref.sum(axis=1)).ravel())


def test_gather_rejects_out_of_range_rows(rng):
    m = random_counts(rng, 10, 10)
    with pytest.raises(IndexError):
        gather_rows(m.indptr, m.indices, m.data, np.array([0, 10]))


def test_gather_rejects_small_output(rng):
    m = random_counts(rng, 10, 10, density=0.5)
    out = (np.empty(11, np.int64), np.empty(1, np.int32), np.empty(1, np.float32))
    with pytest.raises(ValueError, match="output buffers"):
        gather_rows(m.indptr, m.indices, m.data, np.arange(10), out=out)
