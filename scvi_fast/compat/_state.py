"""Explicit mapping between scvi-tools' ``scvi.module.VAE`` state and :class:`~scvi_fast.module.VAE`.

scvi-tools keeps ``nn.Linear`` weights ``(out, in)`` and appends the batch
one-hot as extra input columns of every decoder layer. scvi_fast stores the
encoder's first weight gene-major ``(G, H)`` and each decoder layer's batch
columns as a ``(K, H)`` table. Tensors scvi_fast never computes with (the
library encoder, ``px_dropout_decoder``, ``px_r_decoder``) are returned as a
pass-through dict so that a round trip gives back every tensor unchanged.
"""

from __future__ import annotations

import re

import torch

_ENC = "z_encoder.encoder.fc_layers.Layer {i}.{j}.{p}"
_DEC = "decoder.px_decoder.fc_layers.Layer {i}.{j}.{p}"
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _n_layers(state: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.fc_layers\.Layer (\d+)\.0\.weight$")
    found = [int(m.group(1)) for k in state if (m := pat.match(k))]
    if not found:
        raise ValueError(f"not an scvi-tools SCVI state: no '{prefix}.fc_layers' weights found")
    return max(found) + 1


def scvi_tools_config_from_state(state: dict) -> dict:
    """Architecture (n_input, n_hidden, n_latent, n_layers, n_batch) read off the tensor shapes."""
    n_layers = _n_layers(state, "z_encoder.encoder")
    w0 = state[_ENC.format(i=0, j=0, p="weight")]
    n_hidden, n_input = int(w0.shape[0]), int(w0.shape[1])
    n_latent = int(state["z_encoder.mean_encoder.weight"].shape[0])
    dec0 = state[_DEC.format(i=0, j=0, p="weight")]
    n_cov = int(dec0.shape[1]) - n_latent
    if _n_layers(state, "decoder.px_decoder") != n_layers:
        raise ValueError("encoder and decoder depths differ; only symmetric SCVI models are supported")
    if any(k.startswith("z_encoder.encoder.fc_layers.Layer 0.0") for k in state) and int(
        w0.shape[1]
    ) != int(state["px_r"].shape[0]):
        raise ValueError(
            "the encoder's first layer takes covariates (encode_covariates=True), which "
            "scvi_fast does not support"
        )
    if state["px_r"].dim() != 1:
        raise ValueError(
            "only dispersion='gene' is supported (px_r has shape "
            f"{tuple(state['px_r'].shape)})"
        )
    return {
        "n_input": n_input,
        "n_hidden": n_hidden,
        "n_latent": n_latent,
        "n_layers": n_layers,
        "n_batch": n_cov if n_cov > 1 else 1,
    }


def scvi_tools_state_to_module(state: dict) -> tuple[dict, dict, dict]:
    """Split an scvi-tools VAE ``state_dict`` into scvi_fast's module state.

    Returns ``(module_state, passthrough, config)``; ``passthrough`` holds every
    scvi-tools tensor that has no place in the scvi_fast module, unchanged.
    """
    cfg = scvi_tools_config_from_state(state)
    L, n_latent, n_hidden = cfg["n_layers"], cfg["n_latent"], cfg["n_hidden"]
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out: dict[str, torch.Tensor] = {}
    out["encoder.first.weight"] = take(_ENC.format(i=0, j=0, p="weight")).t().contiguous()
    out["encoder.first.bias"] = take(_ENC.format(i=0, j=0, p="bias"))
    for i in range(L):
        if i > 0:
            out[f"encoder.linears.{i - 1}.weight"] = take(_ENC.format(i=i, j=0, p="weight"))
            out[f"encoder.linears.{i - 1}.bias"] = take(_ENC.format(i=i, j=0, p="bias"))
        for p in _BN:
            out[f"encoder.blocks.{i}.norm.{p}"] = take(_ENC.format(i=i, j=1, p=p))
    for p in ("weight", "bias"):
        out[f"encoder.mean.{p}"] = take(f"z_encoder.mean_encoder.{p}")
        out[f"encoder.var.{p}"] = take(f"z_encoder.var_encoder.{p}")
    for i in range(L):
        n_in = n_latent if i == 0 else n_hidden
        w = take(_DEC.format(i=i, j=0, p="weight"))
        out[f"decoder.linears.{i}.weight"] = w[:, :n_in].contiguous()
        if w.shape[1] > n_in:
            out[f"decoder.linears.{i}.weight_cov"] = w[:, n_in:].t().contiguous()
        out[f"decoder.linears.{i}.bias"] = take(_DEC.format(i=i, j=0, p="bias"))
        for p in _BN:
            out[f"decoder.blocks.{i}.norm.{p}"] = take(_DEC.format(i=i, j=1, p=p))
    out["decoder.scale.weight"] = take("decoder.px_scale_decoder.0.weight")
    out["decoder.scale.bias"] = take("decoder.px_scale_decoder.0.bias")
    out["px_r"] = take("px_r")
    passthrough = {k: v for k, v in state.items() if k not in used}
    return out, passthrough, cfg


def module_state_to_scvi_tools(module_state: dict, passthrough: dict, n_layers: int) -> dict:
    """Inverse of :func:`scvi_tools_state_to_module`: rebuild scvi-tools' ``state_dict``.

    ``passthrough`` must hold the tensors scvi_fast does not use (library
    encoder, ``px_dropout_decoder``, ``px_r_decoder``); see
    :func:`scvi_fast.compat.unused_scvi_tools_heads` to create them for a model
    trained from scratch.
    """
    s = module_state
    out: dict[str, torch.Tensor] = {"px_r": s["px_r"]}
    out[_ENC.format(i=0, j=0, p="weight")] = s["encoder.first.weight"].t().contiguous()
    out[_ENC.format(i=0, j=0, p="bias")] = s["encoder.first.bias"]
    for i in range(n_layers):
        if i > 0:
            out[_ENC.format(i=i, j=0, p="weight")] = s[f"encoder.linears.{i - 1}.weight"]
            out[_ENC.format(i=i, j=0, p="bias")] = s[f"encoder.linears.{i - 1}.bias"]
        for p in _BN:
            out[_ENC.format(i=i, j=1, p=p)] = s[f"encoder.blocks.{i}.norm.{p}"]
    for ours, theirs in (("mean", "mean_encoder"), ("var", "var_encoder")):
        for p in ("weight", "bias"):
            out[f"z_encoder.{theirs}.{p}"] = s[f"encoder.{ours}.{p}"]
    for i in range(n_layers):
        w = s[f"decoder.linears.{i}.weight"]
        cov = s.get(f"decoder.linears.{i}.weight_cov")
        out[_DEC.format(i=i, j=0, p="weight")] = (
            torch.cat([w, cov.t()], dim=1) if cov is not None else w
        ).contiguous()
        out[_DEC.format(i=i, j=0, p="bias")] = s[f"decoder.linears.{i}.bias"]
        for p in _BN:
            out[_DEC.format(i=i, j=1, p=p)] = s[f"decoder.blocks.{i}.norm.{p}"]
    out["decoder.px_scale_decoder.0.weight"] = s["decoder.scale.weight"]
    out["decoder.px_scale_decoder.0.bias"] = s["decoder.scale.bias"]
    out.update(passthrough)
    return out


def unused_scvi_tools_heads(n_input: int, n_hidden: int, n_layers: int, n_batch: int) -> dict:
    """Freshly initialised tensors for the scvi-tools parameters scvi_fast never computes.

    A model trained in scvi_fast has no library encoder, ``px_dropout_decoder``
    or ``px_r_decoder``; scvi-tools' ``load_state_dict`` still wants them. With
    NB likelihood and the observed library size none of them affects any output,
    so ``nn.Linear``/``nn.BatchNorm1d`` default initialisations are written.
    """
    from torch import nn

    out: dict[str, torch.Tensor] = {}
    lin = nn.Linear(n_input, n_hidden)  # library encoder: one hidden layer, no covariates
    bn = nn.BatchNorm1d(n_hidden, eps=1e-3, momentum=0.01)
    for p, t in lin.state_dict().items():
        out[f"l_encoder.encoder.fc_layers.Layer 0.0.{p}"] = t
    for p, t in bn.state_dict().items():
        out[f"l_encoder.encoder.fc_layers.Layer 0.1.{p}"] = t
    for name in ("mean_encoder", "var_encoder"):
        for p, t in nn.Linear(n_hidden, 1).state_dict().items():
            out[f"l_encoder.{name}.{p}"] = t
    for name in ("px_r_decoder", "px_dropout_decoder"):
        for p, t in nn.Linear(n_hidden, n_input).state_dict().items():
            out[f"decoder.{name}.{p}"] = t
    return out
