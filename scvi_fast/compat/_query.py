"""Reference mapping of query data onto a trained model (scArches style, as scvi-tools).

``prepare_query_anndata`` puts a query's genes in the model's order (missing
genes as zero counts); ``load_query_data`` builds a model whose decoder has one
more gathered batch row per new batch category. With ``freeze=True`` only those
new rows train:

* every reference parameter gets ``requires_grad=False``, so the optimiser
  never holds it (weight decay included);
* each decoder layer's ``weight_cov`` becomes ``cat(frozen reference rows (a
  buffer), new rows (a parameter))`` (:class:`QueryCovariateLinear`), whose
  ``state_dict`` still shows a single ``weight_cov``;
* every ``BatchNorm1d`` stays in eval mode while the model trains
  (:class:`FrozenBatchNorm1d`): the reference's running statistics normalise the
  query, and neither they nor ``num_batches_tracked`` change.

When the reference had a single batch category (no batch columns at all), the
reference category's row is zero, so reference cells decode exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from scvi_fast.module._layers import CovariateLinear

logger = logging.getLogger(__name__)

#: below this fraction of the reference's genes found in the query, warn (as scvi-tools)
MIN_VAR_NAME_RATIO = 0.8


# --------------------------------------------------------------- frozen layers --
class FrozenBatchNorm1d(nn.BatchNorm1d):
    """A ``BatchNorm1d`` that stays in eval mode: running statistics, never updated."""

    def train(self, mode: bool = True):
        return super().train(False)


class QueryCovariateLinear(CovariateLinear):
    """A :class:`CovariateLinear` whose first ``n_frozen`` batch rows are fixed.

    ``weight`` and ``bias`` are the reference's parameters (frozen by the caller);
    ``weight_cov`` is ``cat(weight_cov_frozen, weight_cov_new)``, where only
    ``weight_cov_new`` is a parameter. ``state_dict`` / ``load_state_dict`` use
    the plain layer's keys (``weight``, ``bias``, ``weight_cov``).
    """

    def __init__(self, layer: CovariateLinear, n_frozen: int):
        nn.Module.__init__(self)
        if layer.weight_cov is None or not 0 <= n_frozen <= layer.n_cov:
            raise ValueError(f"cannot freeze {n_frozen} rows of a layer with {layer.n_cov} batch rows")
        self.n_in, self.n_out, self.n_cov, self.n_frozen = layer.n_in, layer.n_out, layer.n_cov, n_frozen
        self.weight = layer.weight
        self.bias = layer.bias
        cov = layer.weight_cov.detach()
        self.register_buffer("weight_cov_frozen", cov[:n_frozen].clone(), persistent=False)
        self.weight_cov_new = nn.Parameter(cov[n_frozen:].clone())

    @property
    def weight_cov(self) -> torch.Tensor:  # type: ignore[override]
        return torch.cat([self.weight_cov_frozen, self.weight_cov_new], dim=0)

    def forward(self, h: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        if cov is None:
            raise ValueError("this layer was built with covariates; pass their codes")
        y = torch.nn.functional.linear(h, self.weight, self.bias)
        return y + self.weight_cov.index_select(0, cov.reshape(-1))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in (("weight", self.weight), ("bias", self.bias), ("weight_cov", self.weight_cov)):
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        targets = {"weight": (self.weight,), "bias": (self.bias,),
                   "weight_cov": (self.weight_cov_frozen, self.weight_cov_new)}
        for name, parts in targets.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            src = state_dict[key]
            want = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            if tuple(src.shape) != tuple(want):
                error_msgs.append(f"size mismatch for {key}: got {tuple(src.shape)}, expected {want}")
                continue
            with torch.no_grad():
                start = 0
                for p in parts:
                    p.copy_(src[start : start + p.shape[0]])
                    start += p.shape[0]
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in targets:
                    unexpected_keys.append(key)


def freeze_for_query(module: nn.Module, n_frozen_batches: int) -> nn.Module:
    """Freeze ``module`` (a :class:`~scvi_fast.module.VAE`) in place except the batch rows from ``n_frozen_batches`` on."""
    for p in module.parameters():
        p.requires_grad_(False)
    linears = module.decoder.linears
    for i, layer in enumerate(linears):
        if layer.weight_cov is not None:
            linears[i] = QueryCovariateLinear(layer, n_frozen_batches)
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = FrozenBatchNorm1d
            m.eval()
    return module


# ------------------------------------------------------------- query genes --
def reference_var_names(reference) -> list[str]:
    """Gene names of a model, or of a model folder (scvi_fast or scvi-tools)."""
    registry = getattr(reference, "registry", None)
    if registry is not None:
        return list(registry["var_names"])
    path = Path(reference)
    if (path / "config.json").exists():
        return list(json.loads((path / "config.json").read_text())["registry"]["var_names"])
    if (path / "model.pt").exists():
        from scvi_fast.compat._pickle import safe_load_checkpoint

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


def prepare_query_anndata(adata, reference, return_reference_var_names: bool = False, inplace: bool = True):
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


# ------------------------------------------------------------- query model --
def _extended(categories: list[str], values: pd.Series | None) -> list[str]:
    if values is None:
        return list(categories)
    cat = values if isinstance(values.dtype, pd.CategoricalDtype) else values.astype("category")
    if cat.isna().any():
        raise ValueError(f"column {values.name!r} has missing values; fill them before mapping")
    seen = set(categories)
    present = [str(c) for c in cat.cat.remove_unused_categories().cat.categories]
    return list(categories) + [c for c in present if c not in seen]


def load_query_data(cls, adata, reference, freeze: bool = True, inplace_subset_query_vars: bool = False,
                    device: str = "cpu", impl: str | None = None, seed: int = 0):
    """A model for query ``adata`` from ``reference`` (a model or a model folder).

    New batch categories get new rows (fresh ``nn.Linear``-style initialisation,
    drawn from ``seed``) in every decoder layer's ``weight_cov``; everything else
    is the reference's. With ``freeze=True`` only the new rows train (see
    :func:`freeze_for_query`). The returned model has ``is_trained == False``;
    its latent representation is usable before any training (the encoder does
    not read the batch).
    """
    from scvi_fast import data as _data

    ref = reference if hasattr(reference, "registry") else cls.load(reference, device="cpu")
    reg = ref.registry
    query_genes = [str(v) for v in adata.var_names]
    if query_genes != list(reg["var_names"]):
        if inplace_subset_query_vars and set(reg["var_names"]) <= set(query_genes):
            adata._inplace_subset_var(pd.Index(query_genes).get_indexer(reg["var_names"]))
        else:
            raise ValueError(
                "the query's genes differ from the reference model's; call "
                "SCVI.prepare_query_anndata(adata, reference) first (it reorders genes and "
                "fills missing ones with zeros)"
            )
    if reg["batch_key"] and reg["batch_key"] not in adata.obs:
        raise KeyError(
            f"the reference was trained with batch_key={reg['batch_key']!r}, which is not a "
            "column of the query's obs"
        )
    layer = reg["layer"] or None
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"the reference reads layer {layer!r}, which the query lacks")
    _data.check_counts(adata, layer=layer)

    batch_cats = _extended(reg["batch_categories"], adata.obs[reg["batch_key"]] if reg["batch_key"] else None)
    labels_key = reg["labels_key"]
    labels_cats = _extended(
        reg["labels_categories"], adata.obs[labels_key] if labels_key and labels_key in adata.obs else None
    )
    registry = {**reg, "source": "anndata", "batch_categories": batch_cats, "labels_categories": labels_cats}
    p = dict(ref.init_params_)
    stored_impl = p.pop("impl", "auto")
    model = cls(None, impl=impl or stored_impl, _registry=registry, **p)

    k_ref, k_new = len(reg["batch_categories"]), len(batch_cats)
    new_state = model.module.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, ref_t in ref.module.state_dict().items():
            if key not in new_state:
                raise ValueError(f"reference tensor {key} has no place in the query model")
            if key.endswith("weight_cov"):
                continue
            new_state[key] = ref_t.detach().cpu().clone()
        for i in range(model.module.n_layers):
            key = f"decoder.linears.{i}.weight_cov"
            if key not in new_state:
                continue
            n_in = new_state[f"decoder.linears.{i}.weight"].shape[1]
            bound = 1.0 / math.sqrt(n_in + k_new)
            table = (torch.rand(new_state[key].shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            table = table.to(new_state[key].dtype)
            ref_cov = ref.module.state_dict().get(key)
            if ref_cov is not None:
                table[:k_ref] = ref_cov.detach().cpu()
            else:  # a single reference category had no batch columns: its row is zero
                table[:k_ref] = 0
            new_state[key] = table
    model.module.load_state_dict(new_state)
    model._passthrough = {k: v.detach().cpu().clone() for k, v in ref._passthrough.items()}
    if freeze:
        if k_new == k_ref:
            warnings.warn(
                "the query has no new batch categories: with freeze=True nothing is left to "
                "train; embed it as is with get_latent_representation()",
                UserWarning,
                stacklevel=2,
            )
        freeze_for_query(model.module, k_ref)
    model.is_trained_ = False
    model.adata = model._transfer_setup(adata)
    from scvi_fast.train import resolve_device

    model.device = resolve_device(device)
    model.module.to(model.device).eval()
    return model
