"""A conversion run in its own process, for the tests of killed and racing conversions.

``python _convert_worker.py DEST MARKER SEED N_CHUNKS GO``: converts ``N_CHUNKS`` chunks of
random counts to the store ``DEST`` (``overwrite=True``), touching ``MARKER`` once the first
chunk is written and then waiting until the file ``GO`` exists (``-``: no wait), so that a test
can kill it or run another conversion while this one is in progress.
"""

import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scvi_fast.data import ChunkSource, CSRStore

CHUNK, GENES = 50, 30


def main(dest, marker, seed, n_chunks, go):
    rng = np.random.default_rng(int(seed))
    n_chunks = int(n_chunks)

    def chunks(_size):
        for k in range(n_chunks):
            m = sp.random(CHUNK, GENES, density=0.3, format="csr", random_state=rng,
                          data_rvs=lambda n: rng.integers(1, 9, size=n)).astype(np.float32)
            m = m + sp.eye(CHUNK, GENES, dtype=np.float32, format="csr")  # no empty cells
            yield k * CHUNK, sp.csr_matrix(m)
            if k == 0:
                Path(marker).touch()
                while go != "-" and not Path(go).exists():
                    time.sleep(0.05)

    src = ChunkSource(chunks, n_chunks * CHUNK, GENES)
    store = CSRStore.create(dest, src, overwrite=True)
    print(store.n_cells, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
