"""The input dispatcher: :func:`as_source` turns anything the data path reads into a source."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from ._categories import obs_categories
from ._readers import read_10x_h5_source, read_h5ad_source, read_mtx_source, soma_source
from ._source import ArraySource, Source
from ._store import CSRStore


def as_source(obj, layer: str | None = None, batch_codes=None, labels_codes=None,
              batch_key: str | None = None, labels_key: str | None = None) -> Source:
    """Wrap anything the data path reads as a :class:`Source`.

    Parameters
    ----------
    obj
        An in-memory AnnData (CSR, CSC or dense ``X`` or ``layer``), a backed AnnData, a path to
        an ``.h5ad``, a 10x ``.h5``, a ``.mtx``/``.mtx.gz`` file or 10x mtx directory, a
        :class:`CSRStore` or a path to a store directory, a TileDB-SOMA ``ExperimentAxisQuery``,
        a scipy sparse matrix or dense array, or a :class:`Source`.
    layer
        AnnData layer holding the counts (default ``X``).
    batch_codes, labels_codes
        Integer codes per cell; override the stored ones.
    batch_key, labels_key
        obs columns to read codes (and categories) from, for AnnData / h5ad / SOMA inputs; coded
        by :func:`categorize` (unused categories dropped, missing values an error).

    Returns
    -------
    Source
        With ``n_cells``, ``n_genes``, ``var_names``, ``batch_codes``, ``labels_codes``.
    """
    src: Source
    if isinstance(obj, Source):
        src = obj
    elif isinstance(obj, CSRStore):
        src = obj.source
    elif isinstance(obj, (str, os.PathLike)):
        src = _path_source(Path(obj), layer, batch_key, labels_key)
    elif sp.issparse(obj) or isinstance(obj, np.ndarray):
        src = ArraySource.from_matrix(obj)
    elif type(obj).__name__ == "AnnData" or hasattr(obj, "obs_names") and hasattr(obj, "X"):
        src = _anndata_source(obj, layer, batch_key, labels_key)
    elif type(obj).__name__ == "ExperimentAxisQuery":
        src = soma_source(obj, batch_key=batch_key, labels_key=labels_key)
    else:
        raise TypeError(f"cannot read cells from an object of type {type(obj).__name__}")
    if batch_codes is not None or labels_codes is not None:
        src = src.with_codes(batch_codes, labels_codes)
    return src


def _anndata_source(adata, layer=None, batch_key=None, labels_key=None) -> Source:
    if getattr(adata, "isbacked", False):
        return read_h5ad_source(adata.filename, layer, batch_key, labels_key)
    m = adata.X if layer is None else adata.layers[layer]
    if m is None:
        raise ValueError("adata.X is None; pass layer= to choose a count layer")
    if not (sp.issparse(m) or isinstance(m, np.ndarray)):
        # backed sparse datasets or other array types
        m = m.to_memory() if hasattr(m, "to_memory") else m[...]
    bc, bcat = obs_categories(adata.obs, batch_key)
    lc, lcat = obs_categories(adata.obs, labels_key)
    src = ArraySource.from_matrix(
        m, var_names=adata.var_names, obs_names=adata.obs_names.to_numpy(), batch_codes=bc,
        labels_codes=lc,
    )
    src.batch_categories, src.labels_categories = bcat, lcat
    return src


def _path_source(path: Path, layer, batch_key, labels_key) -> Source:
    if not path.exists():
        raise FileNotFoundError(path)
    name = path.name.lower()
    if path.is_dir():
        if (path / "manifest.json").exists():
            return CSRStore.open(path).source
        if any((path / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
            return read_mtx_source(path)
        raise ValueError(f"{path} is neither a CSR store nor a 10x mtx directory")
    if name.endswith(".h5ad"):
        return read_h5ad_source(path, layer, batch_key, labels_key)
    if name.endswith((".h5", ".hdf5")):
        with h5py.File(path, "r") as f:
            is_anndata = "X" in f and "obs" in f
        if is_anndata:
            return read_h5ad_source(path, layer, batch_key, labels_key)
        return read_10x_h5_source(path)
    if name.endswith((".mtx", ".mtx.gz")):
        return read_mtx_source(path)
    raise ValueError(f"unrecognised input {path}: expected .h5ad, .h5, .mtx(.gz) or a store")
