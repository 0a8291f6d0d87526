"""Explicit mapping between scvi-tools' ``scvi.module.VAE`` state and :class:`~scvi_fast.module.VAE`.

scvi-tools keeps ``nn.Linear`` weights ``(out, in)`` and appends the continuous
covariates and the one-hots of the batch and the categorical covariates as extra input
columns, ``[h, cont, onehot(batch), onehot(cat_1), ...]`` (decoder layers; encoder layers with
``encode_covariates``). scvi_fast stores the encoder's first weight gene-major ``(G, H)``,
the continuous columns as ``weight_cont`` and the one-hot columns as one stacked ``(K, H)``
table ``weight_cov`` per layer; the library encoder ``l_encoder`` is laid out like the ``z``
encoder, with the same covariate columns. The ``px_dropout_decoder`` and ``px_r_decoder`` heads are
top-level modules of :class:`~scvi_fast.module.VAE`. Tensors a model of the given
options never computes with (the library encoder with the observed library size,
``px_dropout_decoder`` unless ZINB, ``px_r_decoder`` unless ``"gene-cell"``) are
returned as a pass-through dict so that a round trip gives back every tensor unchanged.
"""

from __future__ import annotations

import re
from typing import NamedTuple

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
    n_input = int(state["decoder.px_scale_decoder.0.weight"].shape[0])
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


class Layer(NamedTuple):
    """How a layer weight with covariate columns maps (:func:`_split`); a key pair's other
    ``how`` values are False (the tensor as it is) and True (transposed)."""

    n_in: int
    n_cont: int = 0
    gene_major: bool = False


def _encoder_keys(ours: str, theirs: str, n_layers: int, n_input: int, n_hidden: int,
                  n_cont: int = 0) -> list[tuple[str, str, object]]:
    """``(scvi_fast key, scvi-tools key, how)`` of every tensor of an encoder: scvi_fast's
    ``Encoder`` at ``ours`` (``"encoder"``, ``"l_encoder"``), scvi-tools' at ``theirs``.

    A layer weight's scvi_fast key is its prefix (``weight``, ``weight_cont``, ``weight_cov``
    below it); ``n_cont``: the continuous columns of the first layer (``encode_covariates``).
    """
    fc = theirs + ".encoder.fc_layers.Layer {i}.{j}.{p}"
    keys = [(f"{ours}.first", fc.format(i=0, j=0, p="weight"), Layer(n_input, n_cont, True)),
            (f"{ours}.first.bias", fc.format(i=0, j=0, p="bias"), False)]
    for i in range(n_layers):
        if i > 0:
            keys += [(f"{ours}.linears.{i - 1}", fc.format(i=i, j=0, p="weight"),
                      Layer(n_hidden)),
                     (f"{ours}.linears.{i - 1}.bias", fc.format(i=i, j=0, p="bias"), False)]
        keys += [(f"{ours}.blocks.{i}.norm.{p}", fc.format(i=i, j=1, p=p), False) for p in _BN]
    for mine, head in (("mean", "mean_encoder"), ("var", "var_encoder")):
        keys += [(f"{ours}.{mine}.{p}", f"{theirs}.{head}.{p}", False) for p in ("weight", "bias")]
    return keys


def _decoder_keys(n_layers: int, n_latent: int, n_hidden: int,
                  n_cont: int = 0) -> list[tuple[str, str, object]]:
    """The decoder's keys as :func:`_encoder_keys`; continuous columns in the first layer."""
    keys = []
    for i in range(n_layers):
        keys += [(f"decoder.linears.{i}", _DEC.format(i=i, j=0, p="weight"),
                  Layer(n_latent if i == 0 else n_hidden, n_cont if i == 0 else 0)),
                 (f"decoder.linears.{i}.bias", _DEC.format(i=i, j=0, p="bias"), False)]
        keys += [(f"decoder.blocks.{i}.norm.{p}", _DEC.format(i=i, j=1, p=p), False)
                 for p in _BN]
    keys += [(f"decoder.scale.{p}", f"decoder.px_scale_decoder.0.{p}", False)
             for p in ("weight", "bias")]
    return keys


def _head_keys(gene_likelihood: str, dispersion: str, use_observed_lib_size: bool,
               n_input: int, n_hidden: int, n_cont_encoder: int = 0) -> list:
    """``(scvi_fast key, scvi-tools key, how)`` of the tensors the generative options add to
    the module (dispersion table or head, dropout head, library encoder and prior)."""
    keys = [] if dispersion == "gene-cell" else [("px_r", "px_r", False)]
    heads = (["px_r_decoder"] if dispersion == "gene-cell" else []) + (
        ["px_dropout_decoder"] if gene_likelihood == "zinb" else [])
    keys += [(f"{h}.{p}", f"decoder.{h}.{p}", False) for h in heads for p in ("weight", "bias")]
    if not use_observed_lib_size:
        keys += _encoder_keys("l_encoder", "l_encoder", 1, n_input, n_hidden, n_cont_encoder)
        keys += [(k, k, False) for k in ("library_log_means", "library_log_vars")]
    return keys


def _module_keys(cfg: dict, n_cont: int, encode_covariates: bool, gene_likelihood: str,
                 dispersion: str, use_observed_lib_size: bool) -> list:
    """Every key pair of a module of this architecture and these options."""
    n_in, n_hidden = cfg["n_input"], cfg["n_hidden"]
    enc_cont = n_cont if encode_covariates else 0
    return (_encoder_keys("encoder", "z_encoder", cfg["n_layers"], n_in, n_hidden, enc_cont)
            + _head_keys(gene_likelihood, dispersion, use_observed_lib_size, n_in, n_hidden,
                         enc_cont)
            + _decoder_keys(cfg["n_layers"], cfg["n_latent"], n_hidden, n_cont))


def scvi_tools_state_to_module(state: dict, gene_likelihood: str = "nb", dispersion: str = "gene",
                               use_observed_lib_size: bool = True,
                               covariates: dict | None = None) -> tuple[dict, dict, dict]:
    """Split an scvi-tools VAE ``state_dict`` into scvi_fast's module state.

    Returns ``(module_state, passthrough, config)``; ``passthrough`` holds every
    scvi-tools tensor that has no place in the scvi_fast module of these options, unchanged.
    ``covariates``: see :func:`scvi_tools_config_from_state`. scvi-tools' layer inputs are
    ``[h, cont, onehot(batch), onehot(cat_1), ...]``: the continuous columns become
    ``weight_cont`` (``(n_cont, H)`` gene-major in the encoders' first layer, ``(H, n_cont)``
    elsewhere), the one-hot columns one stacked ``weight_cov`` table ``(K, H)``.
    """
    cfg = scvi_tools_config_from_state(state, covariates)
    cov = _covariates(covariates)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"not an scvi-tools SCVI state of these settings: no {key!r}")
        used.add(key)
        return state[key]

    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _module_keys(cfg, int(cov["n_continuous_cov"]),
                                          cov["encode_covariates"], gene_likelihood,
                                          dispersion, use_observed_lib_size):
        t = take(theirs)
        if isinstance(how, Layer):
            w, cont, cats = _split(t, how.n_in, how.n_cont)
            out[f"{ours}.weight"] = w.t().contiguous() if how.gene_major else w
            if cont is not None:
                out[f"{ours}.weight_cont"] = cont.t().contiguous() if how.gene_major else cont
            if cats is not None:
                out[f"{ours}.weight_cov"] = cats
        else:
            out[ours] = t.t().contiguous() if how else t
    passthrough = {k: v for k, v in state.items() if k not in used}
    return out, passthrough, cfg


def module_state_to_scvi_tools(module_state: dict, passthrough: dict, n_layers: int,
                               gene_likelihood: str = "nb", dispersion: str = "gene",
                               use_observed_lib_size: bool = True) -> dict:
    """Inverse of :func:`scvi_tools_state_to_module`: rebuild scvi-tools' ``state_dict``.

    The covariate columns are read off the module state (``weight_cont`` / ``weight_cov``
    where a layer has them). ``passthrough`` must hold the tensors the module of these
    options does not have (library encoder, ``px_dropout_decoder``, ``px_r_decoder``, as they
    apply); see :func:`scvi_fast.compat.unused_scvi_tools_heads` to create them for a model
    trained from scratch.
    """
    s = module_state
    # the shapes only decide how columns split on import; the export joins what is there
    cfg = {"n_input": 0, "n_hidden": 0, "n_latent": 0, "n_layers": n_layers}

    def joined(prefix: str, gene_major: bool) -> torch.Tensor:
        w, cont = s[f"{prefix}.weight"], s.get(f"{prefix}.weight_cont")
        if gene_major:
            w, cont = w.t(), (cont.t() if cont is not None else None)
        return _join(w, cont, s.get(f"{prefix}.weight_cov")).contiguous()

    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _module_keys(cfg, 0, False, gene_likelihood, dispersion,
                                          use_observed_lib_size):
        if isinstance(how, Layer):
            out[theirs] = joined(ours, how.gene_major)
        else:
            out[theirs] = s[ours].t().contiguous() if how else s[ours]
    out.update(passthrough)
    return out


def unused_scvi_tools_heads(n_input: int, n_hidden: int, n_layers: int, n_batch: int,
                            n_encoder_input: int | None = None) -> dict:
    """Freshly initialised tensors for the scvi-tools parameters scvi_fast never computes.

    A model trained in scvi_fast has only the heads its options use (library encoder,
    ``px_dropout_decoder``, ``px_r_decoder``); scvi-tools' ``load_state_dict`` still wants
    the others. They affect no output of a model of those options, so ``nn.Linear`` /
    ``nn.BatchNorm1d`` default initialisations are written (the caller keeps those the
    module has). ``n_encoder_input``: the library encoder's inputs (genes, plus the covariate
    columns with ``encode_covariates=True``; default ``n_input``).
    """
    from torch import nn

    out: dict[str, torch.Tensor] = {}
    lin = nn.Linear(n_encoder_input or n_input, n_hidden)  # library encoder: one layer
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
