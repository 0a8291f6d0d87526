"""Writing ``.h5ad`` files under pandas 2 and pandas 3 alike."""

from __future__ import annotations

import os
from pathlib import Path

import anndata


def write_h5ad(adata, path: str | os.PathLike, **kwargs) -> Path:
    """``adata.write_h5ad(path, **kwargs)`` that also works with pandas 3's string dtype.

    pandas 3 stores strings (obs/var names, text columns) as ``pd.StringDtype`` arrays, and
    anndata 0.11+ refuses to write those unless ``anndata.settings.allow_write_nullable_strings``
    is set, since anndata older than 0.11 cannot read them back. That setting is turned on for
    this write only, where it exists; under pandas 2 (object strings) nothing changes. Files
    written from pandas 3 strings need anndata 0.11 or later to be read.

    Parameters
    ----------
    adata
        The AnnData to write (in memory).
    path
        Destination ``.h5ad``.
    **kwargs
        Passed to :meth:`anndata.AnnData.write_h5ad` (e.g. ``compression``).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    settings = getattr(anndata, "settings", None)
    if settings is not None and hasattr(settings, "allow_write_nullable_strings"):
        with settings.override(allow_write_nullable_strings=True):
            adata.write_h5ad(path, **kwargs)
    else:
        adata.write_h5ad(path, **kwargs)
    return path
