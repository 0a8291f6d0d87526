import zlib

import numpy as np
import pytest

from _data_helpers import SHARED_DATA


@pytest.fixture
def rng(request):
    # fresh inputs per test, reproducible from the test name
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_adata():
    from scvi_fast.data import synthetic_anndata

    return synthetic_anndata(n_cells=1500, n_genes=300, n_batches=3, n_cell_types=4,
                             density=0.15, seed=3)
