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


#: the covariate settings of a model with no covariates beyond the batch
NO_COVARIATES = {"n_cats_per_cov": (), "n_continuous_cov": 0, "encode_covariates": False,
                 "deeply_inject_covariates": True}


def _covariates(covariates: dict | None) -> dict:
    cov = {**NO_COVARIATES, **(covariates or {})}
    cov["n_cats_per_cov"] = tuple(int(k) for k in cov["n_cats_per_cov"])
    return cov


def scvi_tools_config_from_state(state: dict, covariates: dict | None = None) -> dict:
    """Architecture (n_input, n_hidden, n_latent, n_layers, n_batch) read off the tensor shapes.

    ``covariates`` (``n_cats_per_cov``, ``n_continuous_cov``, ``encode_covariates``,
    ``deeply_inject_covariates``, from the model's ``init_params_`` and registry) says how the
    extra input columns split; without it the model must have none beyond the batch.
    """
    cov = _covariates(covariates)
    n_cont = int(cov["n_continuous_cov"])
    n_cats = sum(k for k in cov["n_cats_per_cov"] if k > 1)
    n_layers = _n_layers(state, "z_encoder.encoder")
    w0 = state[_ENC.format(i=0, j=0, p="weight")]
    n_hidden = int(w0.shape[0])
    n_input = int(state["px_r"].shape[0])
    n_latent = int(state["z_encoder.mean_encoder.weight"].shape[0])
    dec0 = state[_DEC.format(i=0, j=0, p="weight")]
    n_cov = int(dec0.shape[1]) - n_latent - n_cont - n_cats  # the batch's one-hot columns
    if _n_layers(state, "decoder.px_decoder") != n_layers:
        raise ValueError("encoder and decoder depths differ; only symmetric SCVI models are supported")
    if n_cov < 0 or n_cov == 1:
        raise ValueError(
            f"the decoder's first layer has {int(dec0.shape[1])} inputs, which do not split into "
            f"{n_latent} latent dims, {n_cont} continuous and {n_cats} categorical covariate "
            "columns and a batch; the recorded covariates do not fit the weights")
    n_enc = n_input + (n_cont + n_cats + n_cov if cov["encode_covariates"] else 0)
    if int(w0.shape[1]) != n_enc:
        raise ValueError(
            f"the encoder's first layer has {int(w0.shape[1])} inputs; {n_enc} expected for "
            f"{n_input} genes with encode_covariates={cov['encode_covariates']}")
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


def _split(w: torch.Tensor, n_in: int, n_cont: int) -> tuple:
    """``(H, n_in + n_cont + K)`` -> ``(weight, weight_cont (H, n_cont), weight_cov (K, H))``,
    the last two None when empty."""
    cont = w[:, n_in:n_in + n_cont].contiguous() if n_cont else None
    cov = w[:, n_in + n_cont:].t().contiguous() if w.shape[1] > n_in + n_cont else None
    return w[:, :n_in].contiguous(), cont, cov


def _join(w: torch.Tensor, cont: torch.Tensor | None, cov: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`_split`."""
    parts = [w] + ([cont] if cont is not None else []) + ([cov.t()] if cov is not None else [])
    return torch.cat(parts, dim=1).contiguous() if len(parts) > 1 else w


def scvi_tools_state_to_module(state: dict, covariates: dict | None = None
                               ) -> tuple[dict, dict, dict]:
    """Split an scvi-tools VAE ``state_dict`` into scvi_fast's module state.

    Returns ``(module_state, passthrough, config)``; ``passthrough`` holds every
    scvi-tools tensor that has no place in the scvi_fast module, unchanged. ``covariates``: see
    :func:`scvi_tools_config_from_state`. scvi-tools' layer inputs are ``[h, cont,
    onehot(batch), onehot(cat_1), ...]``: the continuous columns become ``weight_cont``
    (``(n_cont, H)`` gene-major in the encoder's first layer, ``(H, n_cont)`` elsewhere), the
    one-hot columns one stacked ``weight_cov`` table ``(K, H)``.
    """
    cfg = scvi_tools_config_from_state(state, covariates)
    cov = _covariates(covariates)
    n_cont = int(cov["n_continuous_cov"])
    L, n_latent, n_hidden = cfg["n_layers"], cfg["n_latent"], cfg["n_hidden"]
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    def put(prefix: str, w: torch.Tensor, n_in: int, n_cont: int, first_gene_major=False):
        w, cont, cats = _split(w, n_in, n_cont)
        out[f"{prefix}.weight"] = w.t().contiguous() if first_gene_major else w
        if cont is not None:
            out[f"{prefix}.weight_cont"] = cont.t().contiguous() if first_gene_major else cont
        if cats is not None:
            out[f"{prefix}.weight_cov"] = cats

    out: dict[str, torch.Tensor] = {}
    enc_cont = n_cont if cov["encode_covariates"] else 0
    put("encoder.first", take(_ENC.format(i=0, j=0, p="weight")), cfg["n_input"], enc_cont,
        first_gene_major=True)
    out["encoder.first.bias"] = take(_ENC.format(i=0, j=0, p="bias"))
    for i in range(L):
        if i > 0:
            put(f"encoder.linears.{i - 1}", take(_ENC.format(i=i, j=0, p="weight")), n_hidden, 0)
            out[f"encoder.linears.{i - 1}.bias"] = take(_ENC.format(i=i, j=0, p="bias"))
        for p in _BN:
            out[f"encoder.blocks.{i}.norm.{p}"] = take(_ENC.format(i=i, j=1, p=p))
    for p in ("weight", "bias"):
        out[f"encoder.mean.{p}"] = take(f"z_encoder.mean_encoder.{p}")
        out[f"encoder.var.{p}"] = take(f"z_encoder.var_encoder.{p}")
    for i in range(L):
        put(f"decoder.linears.{i}", take(_DEC.format(i=i, j=0, p="weight")),
            n_latent if i == 0 else n_hidden, n_cont if i == 0 else 0)
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

    def joined(prefix: str, gene_major: bool = False) -> torch.Tensor:
        w, cont = s[f"{prefix}.weight"], s.get(f"{prefix}.weight_cont")
        if gene_major:
            w, cont = w.t(), (cont.t() if cont is not None else None)
        return _join(w, cont, s.get(f"{prefix}.weight_cov")).contiguous()

    out: dict[str, torch.Tensor] = {"px_r": s["px_r"]}
    out[_ENC.format(i=0, j=0, p="weight")] = joined("encoder.first", gene_major=True)
    out[_ENC.format(i=0, j=0, p="bias")] = s["encoder.first.bias"]
    for i in range(n_layers):
        if i > 0:
            out[_ENC.format(i=i, j=0, p="weight")] = joined(f"encoder.linears.{i - 1}")
            out[_ENC.format(i=i, j=0, p="bias")] = s[f"encoder.linears.{i - 1}.bias"]
        for p in _BN:
            out[_ENC.format(i=i, j=1, p=p)] = s[f"encoder.blocks.{i}.norm.{p}"]
    for ours, theirs in (("mean", "mean_encoder"), ("var", "var_encoder")):
        for p in ("weight", "bias"):
            out[f"z_encoder.{theirs}.{p}"] = s[f"encoder.{ours}.{p}"]
    for i in range(n_layers):
        out[_DEC.format(i=i, j=0, p="weight")] = joined(f"decoder.linears.{i}")
        out[_DEC.format(i=i, j=0, p="bias")] = s[f"decoder.linears.{i}.bias"]
        for p in _BN:
            out[_DEC.format(i=i, j=1, p=p)] = s[f"decoder.blocks.{i}.norm.{p}"]
    out["decoder.px_scale_decoder.0.weight"] = s["decoder.scale.weight"]
    out["decoder.px_scale_decoder.0.bias"] = s["decoder.scale.bias"]
    out.update(passthrough)
    return out


def unused_scvi_tools_heads(n_input: int, n_hidden: int, n_layers: int, n_batch: int,
                            n_encoder_input: int | None = None) -> dict:
    """Freshly initialised tensors for the scvi-tools parameters scvi_fast never computes.

    A model trained in scvi_fast has no library encoder, ``px_dropout_decoder``
    or ``px_r_decoder``; scvi-tools' ``load_state_dict`` still wants them. With
    NB likelihood and the observed library size none of them affects any output,
    so ``nn.Linear``/``nn.BatchNorm1d`` default initialisations are written.
    ``n_encoder_input``: the library encoder's inputs (genes, plus the covariate columns with
    ``encode_covariates=True``; default ``n_input``).
    """
    from torch import nn

    out: dict[str, torch.Tensor] = {}
    lin = nn.Linear(n_encoder_input or n_input, n_hidden)  # library encoder: one hidden layer
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
