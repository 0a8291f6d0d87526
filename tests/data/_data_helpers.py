"""Helpers shared by the data tests."""

from pathlib import Path

import numpy as np
import scipy.sparse as sp

# tests/data/<this file>: parents[2] is the repository root; shared/ lies beside it
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def random_counts(rng, n_cells, n_genes, density=0.2, max_count=50, empty_rows=0,
                  indptr_dtype=np.int32):
    """Random CSR counts with some empty rows; never all zeros unless the shape is empty."""
    m = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, max_count + 1, size=k)).astype(np.float32)
    if empty_rows and n_cells:
        rows = rng.choice(n_cells, size=min(empty_rows, n_cells), replace=False)
        m = m.tolil()
        for r in rows:
            m.rows[r] = []
            m.data[r] = []
        m = m.tocsr()
    m.indptr = m.indptr.astype(indptr_dtype)
    m.indices = m.indices.astype(np.int32)
    return m
