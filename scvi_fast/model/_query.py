"""Reference mapping of query data onto a trained model (scArches style, as scvi-tools).

``prepare_query_anndata`` puts a query's genes in the model's order (missing genes as zero
counts); ``load_query_data`` builds a model whose decoder has one more gathered batch row per
new batch category, all else the reference's, and chooses what trains with scvi-tools'
``freeze_*`` flags (:func:`scvi_fast.module.set_online_update`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvi_fast import data as _data
from scvi_fast.compat import safe_load_checkpoint
from scvi_fast.model import _data as _access
from scvi_fast.model._registry import Registry
from scvi_fast.module import FREEZE_DEFAULTS, load_reference_state, set_online_update

logger = logging.getLogger(__name__)

#: below this fraction of the reference's genes found in the query, warn (as scvi-tools)
MIN_VAR_NAME_RATIO = 0.8


def reference_var_names(reference) -> list[str]:
    """Gene names of a model, or of a model folder (scvi_fast or scvi-tools)."""
    registry = getattr(reference, "registry", None)
    if registry is not None:
        return list(registry.var_names)
    path = Path(reference)
    if (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text())
        return list(Registry.from_dict(config["registry"]).var_names)
    if (path / "model.pt").exists():
        return [str(v) for v in np.asarray(safe_load_checkpoint(path / "model.pt")["var_names"]).tolist()]
    raise FileNotFoundError(f"{reference!r} is neither a model nor a model folder")


def _reorder_columns(M, idx: np.ndarray):
    """Columns ``idx`` of ``M`` (``-1``: a zero column), keeping sparse matrices sparse."""
    n = M.shape[0]
    if sp.issparse(M):
        padded = sp.hstack([sp.csc_matrix(M), sp.csc_matrix((n, 1), dtype=M.dtype)], format="csc")
        return padded[:, np.where(idx < 0, M.shape[1], idx)].tocsr()
    M = np.asarray(M)
    out = np.zeros((n, len(idx)), dtype=M.dtype)
    keep = idx >= 0
    out[:, keep] = M[:, idx[keep]]
    return out


def prepare_query_anndata(adata, reference, return_reference_var_names: bool = False,
                          inplace: bool = True):
    """Put ``adata``'s genes in the reference model's order; missing genes become zero counts.

    As ``scvi.model.SCVI.prepare_query_anndata``: logs the fraction of the
    reference's genes found in the query, warns below 80 % and refuses when
    none is found. ``reference`` is a model or a model folder.

    Returns
    -------
    None when ``inplace``; else the new AnnData. With
    ``return_reference_var_names=True``, only the reference's genes (a ``pd.Index``).
    """
    import anndata

    var_names = pd.Index(reference_var_names(reference))
    if return_reference_var_names:
        return var_names
    if getattr(adata, "isbacked", False):
        raise ValueError("prepare_query_anndata needs an in-memory AnnData; use adata.to_memory()")
    query = pd.Index([str(v) for v in adata.var_names])
    if query.has_duplicates:
        dup = query[query.duplicated()].unique().tolist()
        raise ValueError(f"the query has duplicated gene names {dup[:10]}; call adata.var_names_make_unique()")
    n_found = int(var_names.isin(query).sum())
    if n_found == 0:
        raise ValueError("No reference var names found in query data.")
    ratio = n_found / len(var_names)
    logger.info("Found %.2f%% reference vars in query data.", 100 * ratio)
    if ratio < MIN_VAR_NAME_RATIO:
        warnings.warn(
            f"Query data contains less than {MIN_VAR_NAME_RATIO:.0%} of reference var names "
            f"({ratio:.1%}). This may result in poor performance.",
            UserWarning,
            stacklevel=2,
        )
    if query.equals(var_names):
        return None if inplace else adata
    idx = query.get_indexer(var_names)
    out = anndata.AnnData(
        X=_reorder_columns(adata.X, idx),
        obs=adata.obs.copy(),
        var=adata.var.set_axis(query).reindex(var_names),
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        obsp=dict(adata.obsp),
        layers={k: _reorder_columns(v, idx) for k, v in adata.layers.items()},
    )
    if inplace:
        adata._init_as_actual(out)
        return None
    return out


def reference_model_arg(reference_model, reference, where: str):
    """The reference of ``prepare_query_anndata`` / ``load_query_data``: scvi-tools' keyword
    ``reference_model``, or scvi_fast's earlier spelling ``reference``."""
    if reference is not None:
        if reference_model is not None and reference_model is not reference:
            raise TypeError(f"{where}: pass reference_model or its alias reference, not both")
        reference_model = reference
    if reference_model is None:
        raise ValueError("Please provide a reference model as string or loaded model.")
    return reference_model


def load_query_data(cls, adata, reference, device, flags: dict, inplace_subset_query_vars: bool = False,
                    transfer_batch: bool = True, impl: str | None = None, seed: int = 0):
    """A model for query ``adata`` from ``reference`` (a model or a model folder).

    New batch categories get new rows (``nn.Linear``-style initialisation drawn from ``seed``)
    in every decoder layer's ``weight_cov``; everything else is the reference's. ``flags`` are
    ``load_query_data``'s freeze flags (:data:`~scvi_fast.module.FREEZE_DEFAULTS`), applied by
    :func:`~scvi_fast.module.set_online_update`. The returned model has ``is_trained ==
    False``; its latent representation is usable before any training (the encoder does not
    read the batch).
    """
    unknown = sorted(set(flags) - set(FREEZE_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown freeze flags {unknown}")
    ref = reference if hasattr(reference, "registry") else cls.load(reference, device="cpu")
    reg = ref.registry
    _check_query(adata, reg, inplace_subset_query_vars)
    if not transfer_batch and reg.batch_key:
        new = sorted(set(map(str, adata.obs[reg.batch_key].unique())) - set(reg.batch_categories))
        if new:
            raise ValueError("This model does not allow for query having batch categories "
                             f"missing from the reference: {new[:10]}")
    registry = reg.extended_by(adata)
    config = {"init_params": {**ref.init_params_, "impl": impl or ref.init_params_.get("impl", "auto"),
                              "seed": seed},
              "is_trained": False}
    model = cls._from_parts(config, None, registry)
    if model.module.l_encoder is not None:  # the query's prior, as scvi-tools' query model
        means, variances = _access.library_size_prior(registry, adata)
        model.module.library_log_means.copy_(torch.as_tensor(means))
        model.module.library_log_vars.copy_(torch.as_tensor(variances))
    load_reference_state(model.module, ref.module.state_dict(),
                         [reg.n_batch, *reg.n_cats_per_cov])
    model.passthrough = {k: v.detach().cpu().clone() for k, v in ref.passthrough.items()}
    model.scvi_tools_mappings = dict(ref.scvi_tools_mappings)
    model.query_flags_ = {**FREEZE_DEFAULTS, **flags}
    set_online_update(model.module, **model.query_flags_)
    model.device = device
    model.module.to(model.device).eval()
    return model


def _check_query(adata, reg: Registry, inplace_subset_query_vars: bool) -> None:
    """The query must have the reference's genes (or a superset, subset in place on request),
    its batch column and its layer, and valid counts."""
    query_genes = tuple(str(v) for v in adata.var_names)
    if query_genes != reg.var_names:
        if inplace_subset_query_vars and set(reg.var_names) <= set(query_genes):
            adata._inplace_subset_var(pd.Index(query_genes).get_indexer(list(reg.var_names)))
        else:
            raise ValueError(
                "the query's genes differ from the reference model's; call "
                "SCVI.prepare_query_anndata(adata, reference_model) first (it reorders genes and "
                "fills missing ones with zeros)"
            )
    for key in (*reg.categorical_covariate_keys, *reg.continuous_covariate_keys,
                *([reg.size_factor_key] if reg.size_factor_key else [])):
        if key not in adata.obs:
            raise KeyError(f"the reference was set up with obs column {key!r}, which is not a "
                           "column of the query's obs")
    if reg.batch_key and reg.batch_key not in adata.obs:
        raise KeyError(
            f"the reference was trained with batch_key={reg.batch_key!r}, which is not a "
            "column of the query's obs"
        )
    if reg.layer is not None and reg.layer not in adata.layers:
        raise KeyError(f"the reference reads layer {reg.layer!r}, which the query lacks")
    _data.check_counts(adata, layer=reg.layer)
