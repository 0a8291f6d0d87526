"""Frozen layers of reference mapping (scArches style, as scvi-tools' ``load_query_data``).

A query model's decoder has one more gathered batch row per new batch category. With
``freeze=True`` only those new rows train:

* every reference parameter gets ``requires_grad=False``, so the optimiser never holds it
  (weight decay included);
* each decoder layer's ``weight_cov`` becomes ``cat(frozen reference rows (a buffer), new
  rows (a parameter))`` (:class:`QueryCovariateLinear`), whose ``state_dict`` still shows a
  single ``weight_cov``;
* every ``BatchNorm1d`` stays in eval mode while the model trains (:class:`FrozenBatchNorm1d`):
  the reference's running statistics normalise the query, and neither they nor
  ``num_batches_tracked`` change.

When the reference had a single batch category (no batch columns at all), the reference
category's row is zero, so reference cells decode exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from scvi_fast.module._layers import CovariateLinear


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


@torch.no_grad()
def load_reference_state(module: nn.Module, reference_state: dict, n_reference_batches: int) -> None:
    """Copy a reference VAE's ``state_dict`` into ``module``, a VAE with more batch rows.

    Every tensor is the reference's except the batch rows from ``n_reference_batches`` on,
    which keep ``module``'s own (seeded, ``nn.Linear``-style) initialisation; a reference
    without batch columns (one category) gets a zero row for that category.
    """
    state = module.state_dict()
    for key, ref in reference_state.items():
        if key not in state:
            raise ValueError(f"reference tensor {key} has no place in the query model")
        if not key.endswith("weight_cov"):
            state[key] = ref.detach().cpu().clone()
    for key in state:
        if key.endswith("weight_cov"):
            table = state[key].clone()
            ref = reference_state.get(key)
            table[:n_reference_batches] = 0 if ref is None else ref.detach().cpu()
            state[key] = table
    module.load_state_dict(state)
