"""The data path: sources, the on-disk CSR store, readers, HVG selection and the loader.

The ground floor of the package: it imports numpy, scipy, numba, pandas, h5py and anndata,
nothing of scvi_fast above it, and torch only when a minibatch is handed to it. Inside, each
module imports only from those listed before it: ``_csr``, ``_categories`` (the one
category coder), ``_checksum`` (CRC-32C) and ``_atomic`` (folders renamed into place, leftovers
of killed writers removed); ``_source`` (the base classes); ``_readers`` and ``_store`` (the
store format); ``_open`` (``as_source``); ``_counts``; ``_convert`` (``StoreWriter`` and
``CSRStore.create``); ``_hvg``, ``_sampler``, ``_loader`` and ``_synthetic``.
"""

from ._atomic import check_destination
from ._categories import categorize, codes_for
from ._convert import StoreWriter
from ._counts import CountChecker, check_counts
from ._csr import gather_rows, row_offsets
from ._h5ad import write_h5ad
from ._hvg import highly_variable_genes
from ._loader import BufferFetcher, CSRLoader
from ._minibatch import CSRMinibatch, TorchMinibatch
from ._sampler import BlockShuffleSampler, shard_range
from ._open import as_source
from ._readers import read_10x_h5_source, read_mtx_source, soma_source
from ._source import ArraySource, ChunkSource, H5CSRSource, Source
from ._store import CSRStore, StoreCorruptError, is_store
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
    "categorize",
    "check_destination",
    "check_counts",
    "codes_for",
    "gather_rows",
    "highly_variable_genes",
    "is_store",
    "read_10x_h5_source",
    "read_mtx_source",
    "row_offsets",
    "shard_range",
    "soma_source",
    "synthetic_anndata",
    "write_h5ad",
    "write_synthetic_store",
]
