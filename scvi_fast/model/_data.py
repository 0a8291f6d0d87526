"""Data access of a model: row sources coded in the model's categories, loaders, minibatches.

Every read of data by :class:`scvi_fast.SCVI` (training, inference, analysis) goes through
:func:`source_for`, which checks the genes, codes the covariates with the model's
:class:`~scvi_fast.model.Registry` and returns a :class:`scvi_fast.data.Source`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from scvi_fast import data as _data
from scvi_fast.model._config import INFERENCE_BATCH_SIZE, prefetch_default
from scvi_fast.model._registry import Registry, open_data
from scvi_fast.module._generative import init_library_size


def source_for(registry: Registry, data, trusted: bool = False) -> _data.Source:
    """A row source for ``data`` (an AnnData, a CSR store or its path) with the model's codes.

    The data must have the model's genes in the model's order and known categories. An
    in-memory AnnData's counts are checked unless ``trusted`` (the data the model was set up
    with, checked by ``setup_anndata``).
    """
    if data is None:
        raise ValueError("this model holds no data; pass adata=...")
    data = open_data(data)
    registry.check_genes(data.var_names)
    covariates = registry.covariates_of(data)  # a store is refused here if it needs them
    if isinstance(data, _data.CSRStore):
        return _data.as_source(data, batch_codes=_store_codes(registry, data, "batch"),
                               labels_codes=_store_codes(registry, data, "labels"))
    batch = registry.codes_of(data, "batch")
    labels = registry.codes_of(data, "labels")
    if not trusted and not getattr(data, "isbacked", False):
        _data.check_counts(data, layer=registry.layer)
    src = _data.as_source(data, layer=registry.layer,
                          batch_codes=_zeros_if_none(batch, data.n_obs),
                          labels_codes=_zeros_if_none(labels, data.n_obs))
    return src.with_covariates(**covariates) if registry.has_covariates else src


def _store_codes(registry: Registry, store, which) -> np.ndarray | None:
    """A store's codes in the model's categories; None where they already are (no copy)."""
    recorded = store.batch_categories if which == "batch" else store.labels_categories
    if registry.key_of(which) is None or (
            recorded is not None and tuple(map(str, recorded)) == registry.categories_of(which)):
        return None  # the store's own codes (a model without the covariate never reads them)
    return _zeros_if_none(registry.codes_of(store, which), store.n_cells)


def _zeros_if_none(codes, n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64) if codes is None else codes


def register(registry: Registry, data):
    """Set ``data`` up as the model was: genes and batches checked, the setup recorded.

    Stores and paths are returned as they are (they are coded when read).
    """
    if isinstance(data, (str, os.PathLike, _data.CSRStore)):
        return data
    registry.check_genes(data.var_names)
    registry.codes_of(data, "batch")  # raises on a missing column or unknown batches
    registry.covariates_of(data)  # and on missing or unknown covariates
    registry.write_setup(data)
    return data


def loader(source, device: torch.device, indices=None, batch_size: int | None = None,
           pin_memory: bool = False, **kwargs) -> _data.CSRLoader:
    """A :class:`~scvi_fast.data.CSRLoader` over ``source`` for inference (rows in order)."""
    kwargs.setdefault("shuffle", False)
    kwargs.setdefault("prefetch", prefetch_default(device))
    return _data.CSRLoader(
        source, batch_size=batch_size or INFERENCE_BATCH_SIZE,
        indices=None if indices is None else np.asarray(indices, dtype=np.int64),
        pin_memory=pin_memory, **kwargs,
    )


def batches(module, device: torch.device, source, indices=None, batch_size: int | None = None):
    """Yield ``(host minibatch, device minibatch)`` over ``source`` (``indices`` in order)."""
    module.to(device).eval()
    for mb in loader(source, device, indices=indices, batch_size=batch_size):
        yield mb, mb.to(device, non_blocking=True)


def library_size_prior(registry: Registry, data) -> tuple[np.ndarray, np.ndarray]:
    """The library prior of a model with a library encoder, from ``data``'s cells:
    scvi-tools' ``_init_library_size`` (per batch, mean and variance of the log totals)."""
    totals, codes = [], []
    for mb in loader(source_for(registry, data, trusted=True), torch.device("cpu"),
                     prefetch=False):
        totals.append(np.asarray(mb.library, dtype=np.float64))
        codes.append(np.asarray(mb.batch, dtype=np.int64))
    return init_library_size(np.concatenate(totals), np.concatenate(codes), registry.n_batch)


def n_rows(data, indices=None) -> int:
    """Number of cells :func:`batches` yields for ``data`` and ``indices``."""
    if indices is not None:
        return len(np.asarray(indices).reshape(-1))
    data = open_data(data)
    return int(data.n_cells if isinstance(data, _data.CSRStore) else data.n_obs)
