"""Category coding: an obs column to integer codes, and values onto a model's known categories.

Every input (in-memory AnnData, backed ``.h5ad``, TileDB-SOMA, CSR stores) is coded here, so the
same cells get the same categories and codes whatever they were read from.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

#: how many unknown / known categories an error message lists
_N_SHOW = 10


def _show(names: list[str]) -> str:
    return f"{names[:_N_SHOW]}{' ...' if len(names) > _N_SHOW else ''}"


def categorize(values, key: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes and category names of a column, the way ``setup_anndata`` categorises it.

    A categorical column keeps its category order; any other column becomes categorical with
    its distinct values sorted (pandas ``astype("category")``). Categories no cell uses are
    dropped, whatever the input, so an AnnData and a CSR store made from the same cells get the
    same categories and codes. scvi-tools 1.x keeps the unused categories of a categorical
    column (they become batch rows that never train); anndata drops them when it subsets cells,
    so the two agree on data prepared the usual way. Category names are the categories as
    ``str``.

    Parameters
    ----------
    values
        The column: a pandas Series, Index or Categorical, or anything array-like.
    key
        The column's name, used in error messages.

    Returns
    -------
    codes
        int64, one per value, in ``0 .. len(categories) - 1``.
    categories
        The category names (``str``), in code order.

    Raises
    ------
    ValueError
        If a value is missing (NaN / None): every cell needs a category. Or if two categories
        have the same ``str`` form (e.g. ``1`` and ``"1"``).
    """
    cat = pd.Categorical(values)
    missing = cat.codes < 0
    if missing.any():
        raise ValueError(
            f"obs[{key!r}] has {int(missing.sum())} missing values (first at cell "
            f"{int(np.argmax(missing))}); every cell needs a category. Fill them, e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype('object').fillna('unknown'), "
            f"or drop those cells: adata = adata[adata.obs[{key!r}].notna()].copy()"
        )
    cat = cat.remove_unused_categories()
    names = [str(c) for c in cat.categories]
    if len(set(names)) != len(names):
        raise ValueError(
            f"obs[{key!r}] has categories that read the same as text: {_show(names)}; make the "
            f"column one type, e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)"
        )
    return cat.codes.astype(np.int64), names


def codes_for(values, categories, key: str,
              unknown: Literal["error", "missing"] = "error") -> np.ndarray:
    """Codes of ``values`` in a model's known ``categories`` (matched by their ``str`` form).

    Used wherever data meets a model trained on other data: an AnnData or a CSR store
    (:meth:`CSRStore.obs_column`) is coded the same way, and a value the model does not know is
    an error for batches and labels alike, from either input.

    Parameters
    ----------
    values
        The column (anything :func:`categorize` accepts). Unused categories of a categorical
        column are ignored, known or not.
    categories
        The model's categories, in code order.
    key
        The column's name, used in error messages.
    unknown
        ``"error"``: raise on values not in ``categories``; ``"missing"``: give them code -1
        (the caller decides, e.g. to extend the categories; never index with it).

    Returns
    -------
    numpy.ndarray
        int64 codes into ``categories``, one per value.

    Raises
    ------
    ValueError
        With ``unknown="error"``, if values are not among ``categories``: the message names up to
        10 of them and of the known ones. Also if a value is missing (see :func:`categorize`).
    """
    if unknown not in ("error", "missing"):
        raise ValueError(f"unknown must be 'error' or 'missing'; got {unknown!r}")
    known = [str(c) for c in categories]
    lookup = {c: i for i, c in enumerate(known)}
    if len(lookup) != len(known):
        raise ValueError(f"the known categories of {key!r} repeat a name: {_show(known)}")
    codes, present = categorize(values, key)
    remap = np.array([lookup.get(c, -1) for c in present], dtype=np.int64)
    if unknown == "error" and (remap < 0).any():
        new = [c for c, r in zip(present, remap.tolist()) if r < 0]
        raise ValueError(
            f"obs[{key!r}] has {len(new)} categories the model was not trained on: {_show(new)}. "
            f"Known ({len(known)}): {_show(known)}. Map data with new categories with "
            "SCVI.load_query_data(adata, model), or keep only the cells of known categories: "
            f"adata = adata[adata.obs[{key!r}].astype(str).isin(known)].copy()"
        )
    return remap[codes]


def obs_categories(obs, key: str | None) -> tuple[np.ndarray | None, list[str] | None]:
    """:func:`categorize` of column ``key`` of an obs table; ``(None, None)`` without a key."""
    if key is None:
        return None, None
    if key not in obs:
        raise KeyError(f"obs has no column {key!r}; available: {list(obs.columns)[:20]}")
    return categorize(obs[key], key)
