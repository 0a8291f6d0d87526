"""Explicit mapping between scvi-tools' ``scvi.module.VAE`` state and :class:`~scvi_fast.module.VAE`.

scvi-tools keeps ``nn.Linear`` weights ``(out, in)`` and appends the batch
one-hot as extra input columns of every decoder layer. scvi_fast stores the
encoder's first weight gene-major ``(G, H)`` and each decoder layer's batch
columns as a ``(K, H)`` table; the library encoder ``l_encoder`` is laid out like
the ``z`` encoder. The ``px_dropout_decoder`` and ``px_r_decoder`` heads are
top-level modules of :class:`~scvi_fast.module.VAE`. Tensors a model of the given
options never computes with (the library encoder with the observed library size,
``px_dropout_decoder`` unless ZINB, ``px_r_decoder`` unless ``"gene-cell"``) are
returned as a pass-through dict so that a round trip gives back every tensor unchanged.
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
    n_genes = int(state["decoder.px_scale_decoder.0.weight"].shape[0])
    if int(w0.shape[1]) != n_genes:
        raise ValueError(
            "the encoder's first layer takes covariates (encode_covariates=True), which "
            "scvi_fast does not support"
        )
    return {
        "n_input": n_input,
        "n_hidden": n_hidden,
        "n_latent": n_latent,
        "n_layers": n_layers,
        "n_batch": n_cov if n_cov > 1 else 1,
    }


def _encoder_keys(ours: str, theirs: str, n_layers: int) -> list[tuple[str, str, bool]]:
    """``(scvi_fast key, scvi-tools key, transposed)`` of every tensor of an encoder: scvi_fast's
    ``Encoder`` at ``ours`` (``"encoder"``, ``"l_encoder"``), scvi-tools' at ``theirs``."""
    fc = theirs + ".encoder.fc_layers.Layer {i}.{j}.{p}"
    keys = [(f"{ours}.first.weight", fc.format(i=0, j=0, p="weight"), True),
            (f"{ours}.first.bias", fc.format(i=0, j=0, p="bias"), False)]
    for i in range(n_layers):
        if i > 0:
            keys += [(f"{ours}.linears.{i - 1}.{p}", fc.format(i=i, j=0, p=p), False)
                     for p in ("weight", "bias")]
        keys += [(f"{ours}.blocks.{i}.norm.{p}", fc.format(i=i, j=1, p=p), False) for p in _BN]
    for mine, head in (("mean", "mean_encoder"), ("var", "var_encoder")):
        keys += [(f"{ours}.{mine}.{p}", f"{theirs}.{head}.{p}", False) for p in ("weight", "bias")]
    return keys


def _head_keys(gene_likelihood: str, dispersion: str, use_observed_lib_size: bool) -> list:
    """``(scvi_fast key, scvi-tools key, transposed)`` of the tensors the generative options
    add to the module (dispersion table or head, dropout head, library encoder and prior)."""
    keys = [] if dispersion == "gene-cell" else [("px_r", "px_r", False)]
    heads = (["px_r_decoder"] if dispersion == "gene-cell" else []) + (
        ["px_dropout_decoder"] if gene_likelihood == "zinb" else [])
    keys += [(f"{h}.{p}", f"decoder.{h}.{p}", False) for h in heads for p in ("weight", "bias")]
    if not use_observed_lib_size:
        keys += _encoder_keys("l_encoder", "l_encoder", 1)
        keys += [(k, k, False) for k in ("library_log_means", "library_log_vars")]
    return keys


def scvi_tools_state_to_module(state: dict, gene_likelihood: str = "nb", dispersion: str = "gene",
                               use_observed_lib_size: bool = True) -> tuple[dict, dict, dict]:
    """Split an scvi-tools VAE ``state_dict`` into scvi_fast's module state.

    Returns ``(module_state, passthrough, config)``; ``passthrough`` holds every
    scvi-tools tensor that has no place in the scvi_fast module of these options, unchanged.
    """
    cfg = scvi_tools_config_from_state(state)
    L, n_latent, n_hidden = cfg["n_layers"], cfg["n_latent"], cfg["n_hidden"]
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"not an scvi-tools SCVI state of these settings: no {key!r}")
        used.add(key)
        return state[key]

    out: dict[str, torch.Tensor] = {}
    for ours, theirs, transposed in (_encoder_keys("encoder", "z_encoder", L)
                                     + _head_keys(gene_likelihood, dispersion,
                                                  use_observed_lib_size)):
        t = take(theirs)
        out[ours] = t.t().contiguous() if transposed else t
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
    passthrough = {k: v for k, v in state.items() if k not in used}
    return out, passthrough, cfg


def module_state_to_scvi_tools(module_state: dict, passthrough: dict, n_layers: int,
                               gene_likelihood: str = "nb", dispersion: str = "gene",
                               use_observed_lib_size: bool = True) -> dict:
    """Inverse of :func:`scvi_tools_state_to_module`: rebuild scvi-tools' ``state_dict``.

    ``passthrough`` must hold the tensors the module of these options does not have (library
    encoder, ``px_dropout_decoder``, ``px_r_decoder``, as they apply); see
    :func:`scvi_fast.compat.unused_scvi_tools_heads` to create them for a model trained from
    scratch.
    """
    s = module_state
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, transposed in (_encoder_keys("encoder", "z_encoder", n_layers)
                                     + _head_keys(gene_likelihood, dispersion,
                                                  use_observed_lib_size)):
        out[theirs] = s[ours].t().contiguous() if transposed else s[ours]
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

    A model trained in scvi_fast has only the heads its options use (library encoder,
    ``px_dropout_decoder``, ``px_r_decoder``); scvi-tools' ``load_state_dict`` still wants
    the others. They affect no output of a model of those options, so ``nn.Linear`` /
    ``nn.BatchNorm1d`` default initialisations are written (the caller keeps those the
    module has).
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
