"""The data path: sources, the on-disk CSR store, readers, HVG selection and the loader.

Imports numpy, scipy and numba only; torch is imported when a minibatch is moved to a device.
"""

from ._counts import CountChecker, check_counts
from ._csr import gather_rows, row_offsets
from ._h5ad import write_h5ad
from ._hvg import highly_variable_genes
from ._loader import BlockShuffleSampler, BufferFetcher, CSRLoader, CSRMinibatch, TorchMinibatch
from ._readers import read_10x_h5_source, read_mtx_source, soma_source
from ._source import ArraySource, ChunkSource, H5CSRSource, Source, as_source
from ._store import CSRStore, StoreCorruptError, StoreWriter
from ._synthetic import synthetic_anndata, write_synthetic_store

__all__ = [
    "ArraySource",
    "BlockShuffleSampler",
    "BufferFetcher",
    "CSRLoader",
    "CSRMinibatch",
    "CSRStore",
    "ChunkSource",
    "CountChecker",
    "H5CSRSource",
    "Source",
    "StoreCorruptError",
    "StoreWriter",
    "TorchMinibatch",
    "as_source",
    "check_counts",
    "gather_rows",
    "highly_variable_genes",
    "read_10x_h5_source",
    "read_mtx_source",
    "row_offsets",
    "soma_source",
    "synthetic_anndata",
    "write_h5ad",
    "write_synthetic_store",
]
