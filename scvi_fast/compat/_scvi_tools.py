"""scvi-tools model folders (``model.pt``) in and out of :class:`scvi_fast.SCVI`.

``model.pt`` holds ``{"model_state_dict", "var_names", "attr_dict"}``;
``attr_dict`` carries ``init_params_`` (the constructor arguments) and
``registry_`` (``setup_anndata``'s arguments and the categorical mappings of
batch and labels). Reading goes through the restricted unpickler
(:mod:`scvi_fast.compat._pickle`); writing produces what scvi-tools 1.4.2 itself
writes, so that ``scvi.model.SCVI.load(folder, adata)`` opens it.

Compat builds no model: reading returns the parts ``SCVI._from_parts`` takes, and writing
reads only the model's public surface (``registry``, ``passthrough``,
``scvi_tools_mappings``, ``init_params_``, ``history``, ``is_trained``, ``train_indices``,
``validation_indices``, ``adata``, ``module``).
"""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from scvi_fast.compat._pickle import safe_load_checkpoint
from scvi_fast.module._generative import DISPERSIONS, GENE_LIKELIHOODS, LATENT_DISTRIBUTIONS
from scvi_fast.compat._state import (
    module_state_to_scvi_tools,
    scvi_tools_state_to_module,
    unused_scvi_tools_heads,
)

#: the scvi-tools release whose file layout :func:`save_scvi_tools` writes
SCVI_TOOLS_FORMAT_VERSION = "1.4.2"

#: scvi-tools constructor arguments scvi_fast implements at every value of this list
_OPTIONS = {
    "gene_likelihood": GENE_LIKELIHOODS,
    "dispersion": DISPERSIONS,
    "latent_distribution": LATENT_DISTRIBUTIONS,
    "use_observed_lib_size": (True, False),
}
#: scvi-tools constructor arguments scvi_fast implements only at this value
_REQUIRED = {
    "log_variational": True,
    "batch_representation": "one-hot",
    "use_batch_norm": "both",
    "use_layer_norm": "none",
    "use_size_factor_key": False,
    "var_activation": None,
}
#: arguments that change nothing scvi_fast computes (the library prior is read from the
#: weights; autotune payloads are bookkeeping)
_IGNORED = {"library_log_means", "library_log_vars", "extra_payload_autotune", "n_batch", "n_labels"}
_ARCH = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "encode_covariates",
         "deeply_inject_covariates")
#: SCVI.__init__ defaults in scvi-tools 1.x, for checkpoints that omit an argument
_SCVI_DEFAULTS = {
    "n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1,
    "dispersion": "gene", "gene_likelihood": "zinb", "use_observed_lib_size": True,
    "latent_distribution": "normal",
}


def _flat_init_params(init_params: dict) -> dict:
    """``init_params_`` as one flat dict, for both layouts scvi-tools has used."""
    if "non_kwargs" in init_params:
        flat = dict(init_params["non_kwargs"])
        for group in init_params.get("kwargs", {}).values():
            flat.update(group or {})
        return flat
    flat = {k: v for k, v in init_params.items() if not isinstance(v, dict)}
    for v in init_params.values():
        if isinstance(v, dict):
            flat.update(v)
    flat.pop("use_cuda", None)
    flat.pop("use_gpu", None)
    return flat


def _check_supported(params: dict, setup_args: dict, where: str) -> None:
    problems = []
    for key, allowed in _OPTIONS.items():
        if key in params and params[key] not in allowed:
            problems.append(f"{key}={params[key]!r} (scvi_fast supports {list(allowed)})")
    for key, want in _REQUIRED.items():
        if key in params and params[key] != want:
            problems.append(f"{key}={params[key]!r} (scvi_fast supports {want!r})")
    for key in ("extra_encoder_kwargs", "extra_decoder_kwargs", "batch_embedding_kwargs"):
        if params.get(key):
            problems.append(f"{key}={params[key]!r} (scvi_fast supports none)")
    unknown = set(params) - set(_OPTIONS) - set(_REQUIRED) - set(_IGNORED) - set(_ARCH) - {
        "extra_encoder_kwargs", "extra_decoder_kwargs", "batch_embedding_kwargs", "kwargs",
    }
    if unknown:
        problems.append(f"constructor arguments scvi_fast does not know: {sorted(unknown)}")
    for key in ("encode_covariates", "deeply_inject_covariates"):
        if key in params and not isinstance(params[key], (bool, np.bool_)):
            problems.append(f"{key}={params[key]!r} (True or False)")
    if problems:
        raise NotImplementedError(
            f"{where} is an scvi-tools SCVI configuration scvi_fast does not implement: "
            + "; ".join(problems)
            + ". Use scvi-tools for this model."
        )


def _mapping(field_registries: dict, field: str) -> list[str]:
    try:
        mapping = field_registries[field]["state_registry"]["categorical_mapping"]
    except KeyError:
        return ["0"]
    return [str(c) for c in np.asarray(mapping).tolist()]


def read_scvi_tools_folder(dir_path: str | os.PathLike) -> dict:
    """Read and validate ``dir_path/model.pt``; returns the parts of an :class:`SCVI`.

    ``{"config", "state", "registry"}``, as ``SCVI._from_parts`` takes them: ``config`` holds
    the architecture (``init_params``), ``is_trained``, ``history``, the split's indices and
    scvi-tools' category mappings; ``state`` the module's tensors (``module.*``) and the
    scvi-tools tensors a model of these options never computes with (``passthrough.*``:
    library encoder, ``px_dropout`` and ``px_r`` decoder heads where unused, written back
    unchanged on export);
    ``registry`` a registry dict. Raises ``NotImplementedError`` for configurations
    scvi_fast does not implement and :class:`~scvi_fast.compat.UnsafeCheckpointError` for
    files that need more than data to unpickle.
    """
    path = Path(dir_path) / "model.pt"
    ckpt = safe_load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "attr_dict" not in ckpt:
        raise ValueError(f"{path} is not an scvi-tools model file (no model_state_dict/attr_dict)")
    attr = ckpt["attr_dict"]
    registry = attr.get("registry_", {})
    model_name = registry.get("model_name", "SCVI")
    if model_name != "SCVI":
        raise NotImplementedError(
            f"{path} holds an scvi-tools {model_name} model; scvi_fast loads SCVI models only"
        )
    if registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
        raise NotImplementedError(
            f"{path} was set up with {registry.get('setup_method_name')}; only setup_anndata "
            "models are supported"
        )
    params = {**_SCVI_DEFAULTS, **_flat_init_params(attr.get("init_params_", {}))}
    setup_args = dict(registry.get("setup_args", {}))
    _check_supported(params, setup_args, str(path))

    state = {k: v for k, v in ckpt["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    options = {k: params[k] for k in _OPTIONS}
    options["use_observed_lib_size"] = bool(options["use_observed_lib_size"])
    fields = registry.get("field_registries", {})
    covariates = _covariate_setup(setup_args, fields, str(path))
    encode = bool(params.get("encode_covariates", False))
    deep = bool(params.get("deeply_inject_covariates", True))
    try:
        module_state, passthrough, arch = scvi_tools_state_to_module(
            state, options["gene_likelihood"], options["dispersion"],
            options["use_observed_lib_size"], covariates={
                "n_cats_per_cov": [len(c) for c in
                                   covariates["categorical_covariate_categories"]],
                "n_continuous_cov": len(covariates["continuous_covariate_keys"]),
                "encode_covariates": encode, "deeply_inject_covariates": deep})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    batch_cats = _mapping(fields, "batch")
    labels_cats = _mapping(fields, "labels")
    if max(len(batch_cats), 1) != max(arch["n_batch"], 1) and not (
        arch["n_batch"] == 1 and len(batch_cats) <= 1
    ):
        raise ValueError(
            f"{path}: the registry lists {len(batch_cats)} batch categories but the decoder has "
            f"{arch['n_batch']} batch columns"
        )
    var_names = [str(v) for v in np.asarray(ckpt.get("var_names", [])).tolist()]
    if len(var_names) != arch["n_input"]:
        raise ValueError(
            f"{path}: {len(var_names)} var_names for a model of {arch['n_input']} genes"
        )
    for key in ("n_hidden", "n_latent", "n_layers"):
        if key in params and int(params[key]) != arch[key]:
            raise ValueError(
                f"{path}: init_params_ says {key}={params[key]} but the weights have {arch[key]}"
            )
    layer = setup_args.get("layer") or ""
    return {
        "config": {
            "init_params": {
                "n_hidden": arch["n_hidden"], "n_latent": arch["n_latent"],
                "n_layers": arch["n_layers"], "dropout_rate": float(params["dropout_rate"]),
                "encode_covariates": encode, "deeply_inject_covariates": deep,
                **options,
            },
            "is_trained": bool(attr.get("is_trained_", True)),
            "history": _history_lists(attr.get("history_")),
            "scvi_tools_mappings": _mappings(fields),
            **{name: attr[f"{name}_"].astype(np.int64)
               for name in ("train_indices", "validation_indices")
               if isinstance(attr.get(f"{name}_"), np.ndarray)},
        },
        "state": {**{f"module.{k}": v for k, v in module_state.items()},
                  **{f"passthrough.{k}": v for k, v in passthrough.items()}},
        "registry": {
            "batch_key": setup_args.get("batch_key") or "",
            "labels_key": setup_args.get("labels_key") or "",
            "layer": layer,
            "batch_categories": batch_cats,
            "labels_categories": labels_cats,
            "var_names": var_names,
            **covariates,
        },
    }


def _covariate_setup(setup_args: dict, fields: dict, where: str) -> dict:
    """The registry's covariate entries of an scvi-tools setup: keys, each categorical
    covariate's categories (its recorded mapping), the size factor key."""
    cat_keys = [str(k) for k in setup_args.get("categorical_covariate_keys") or []]
    cont_keys = [str(k) for k in setup_args.get("continuous_covariate_keys") or []]
    mappings = fields.get("extra_categorical_covs", {}).get("state_registry", {}).get("mappings", {})
    missing = [k for k in cat_keys if k not in mappings]
    if missing:
        raise ValueError(f"{where}: the registry has no categories for the categorical "
                         f"covariates {missing}")
    columns = fields.get("extra_continuous_covs", {}).get("state_registry", {}).get("columns")
    if cont_keys and (columns is None or [str(c) for c in np.asarray(columns)] != cont_keys):
        raise ValueError(f"{where}: the registry's continuous covariate columns do not match "
                         f"continuous_covariate_keys={cont_keys}")
    return {
        "categorical_covariate_keys": cat_keys,
        "categorical_covariate_categories": [
            [str(c) for c in np.asarray(mappings[k]).tolist()] for k in cat_keys],
        "continuous_covariate_keys": cont_keys,
        "size_factor_key": setup_args.get("size_factor_key") or "",
    }


def _mappings(fields: dict) -> dict[str, np.ndarray]:
    """scvi-tools' own category mappings (e.g. integers), which it matches by value: kept so
    that an export writes them back as they were."""
    return {
        f: np.asarray(fields[f]["state_registry"]["categorical_mapping"])
        for f in ("batch", "labels")
        if "categorical_mapping" in fields.get(f, {}).get("state_registry", {})
    }


def _history_lists(history) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if not isinstance(history, dict):
        return out
    for k, v in history.items():
        try:
            col = v.iloc[:, 0] if hasattr(v, "iloc") and getattr(v, "ndim", 1) == 2 else v
            out[str(k)] = [float(x) for x in np.asarray(col, dtype=np.float64).tolist()]
        except (TypeError, ValueError):
            continue
    return out


# ------------------------------------------------------------------ writing --
def _categorical_field(key: str | None, categories, default_key: str, count_name: str,
                       original_mapping: np.ndarray | None = None) -> dict:
    if key:
        mapping = np.asarray(list(categories), dtype=object)
        if original_mapping is not None and [str(c) for c in original_mapping.tolist()] == list(categories):
            mapping = original_mapping
        original = key
    else:
        mapping = np.array([0])
        original = default_key
    return {
        "data_registry": {"attr_name": "obs", "attr_key": default_key},
        "state_registry": {"categorical_mapping": mapping, "original_key": original},
        "summary_stats": {count_name: len(mapping)},
    }


def scvi_tools_registry(model, n_obs: int) -> dict:
    """The ``registry_`` scvi-tools 1.4.2 writes for ``SCVI.setup_anndata`` with this model's setup."""
    reg = model.registry
    var_names = np.asarray(list(reg.var_names), dtype=object)
    n_vars = len(var_names)
    layer = reg.layer
    fields = defaultdict(dict)
    fields["X"] = {
        "data_registry": {"attr_name": "layers" if layer else "X", "attr_key": layer},
        "state_registry": {"n_obs": int(n_obs), "n_vars": n_vars, "column_names": var_names},
        "summary_stats": {"n_vars": n_vars, "n_cells": int(n_obs)},
    }
    original = model.scvi_tools_mappings
    fields["batch"] = _categorical_field(reg.batch_key, reg.batch_categories, "_scvi_batch",
                                         "n_batch", original.get("batch"))
    fields["labels"] = _categorical_field(reg.labels_key, reg.labels_categories, "_scvi_labels",
                                          "n_labels", original.get("labels"))
    fields["size_factor"] = (
        {"data_registry": {"attr_name": "obs", "attr_key": reg.size_factor_key},
         "state_registry": {}, "summary_stats": {}} if reg.size_factor_key else
        {"data_registry": {}, "state_registry": {}, "summary_stats": {}})
    cat_keys, cont_keys = list(reg.categorical_covariate_keys), list(reg.continuous_covariate_keys)
    fields["extra_categorical_covs"] = {
        "data_registry": {}, "state_registry": {}, "summary_stats": {"n_extra_categorical_covs": 0},
    } if not cat_keys else {
        "data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"},
        "state_registry": {
            "mappings": {k: np.asarray(list(c), dtype=object)
                         for k, c in zip(cat_keys, reg.categorical_covariate_categories)},
            "field_keys": cat_keys, "n_cats_per_key": list(reg.n_cats_per_cov)},
        "summary_stats": {"n_extra_categorical_covs": len(cat_keys)},
    }
    fields["extra_continuous_covs"] = {
        "data_registry": {}, "state_registry": {}, "summary_stats": {"n_extra_continuous_covs": 0},
    } if not cont_keys else {
        "data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"},
        "state_registry": {"columns": np.asarray(cont_keys, dtype=object)},
        "summary_stats": {"n_extra_continuous_covs": len(cont_keys)},
    }
    return {
        "scvi_version": SCVI_TOOLS_FORMAT_VERSION,
        "model_name": "SCVI",
        "setup_args": {
            "layer": layer,
            "batch_key": reg.batch_key,
            "labels_key": reg.labels_key,
            "size_factor_key": reg.size_factor_key,
            "categorical_covariate_keys": cat_keys or None,
            "continuous_covariate_keys": cont_keys or None,
        },
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": str(uuid.uuid4()),
    }


_KEY_ORDER = ("px_r", "library_log_means", "library_log_vars", "z_encoder.", "l_encoder.", "decoder.px_decoder.", "decoder.px_scale_decoder.",
              "decoder.px_r_decoder.", "decoder.px_dropout_decoder.")


def _rank(key: str) -> int:
    for i, prefix in enumerate(_KEY_ORDER):
        if key == prefix or key.startswith(prefix):
            return i
    return len(_KEY_ORDER)


def scvi_tools_state(model) -> dict[str, torch.Tensor]:
    """The scvi-tools ``VAE.state_dict()`` of ``model`` (CPU tensors, scvi-tools' key order)."""
    vae = model.module
    module_state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    options = (vae.gene_likelihood, vae.dispersion, vae.use_observed_lib_size)
    own = set(module_state_to_scvi_tools(module_state, {}, vae.n_layers, *options))
    first = vae.encoder.first
    heads = unused_scvi_tools_heads(vae.n_input, vae.n_hidden, vae.n_layers, vae.n_batch,
                                    n_encoder_input=first.n_in + first.n_cov + first.n_cont)
    passthrough = {k: v.detach().cpu() for k, v in model.passthrough.items() if k not in own}
    for k, v in heads.items():
        if k in own:
            continue
        if k not in passthrough:
            passthrough[k] = v
        elif tuple(passthrough[k].shape) != tuple(v.shape):
            raise ValueError(
                f"passthrough tensor {k} has shape {tuple(passthrough[k].shape)}, expected "
                f"{tuple(v.shape)}"
            )
    state = module_state_to_scvi_tools(module_state, passthrough, vae.n_layers, *options)
    ordered = sorted(state, key=_rank)  # stable: keeps the per-layer order within a group
    return {k: state[k] for k in ordered}


def _covariate_kwargs(model) -> dict:
    """The covariate switches as scvi-tools records keyword arguments: both, when the model has
    covariates or a switch off its default; none otherwise (a default SCVI(adata))."""
    arch = model.init_params_
    flags = {k: bool(arch.get(k, d)) for k, d in (("encode_covariates", False),
                                                   ("deeply_inject_covariates", True))}
    default = not flags["encode_covariates"] and flags["deeply_inject_covariates"]
    return {} if default and not model.registry.has_covariates else flags


def save_scvi_tools(model, folder: str | os.PathLike) -> Path:
    """Write ``folder/model.pt`` in scvi-tools 1.4.2's layout; returns its path.

    ``scvi.model.SCVI.load(folder, adata=...)`` opens it and gives the same latent
    representation. A model trained in scvi_fast gets freshly initialised tensors
    for the heads scvi-tools keeps but a model of its options never uses
    (:func:`~scvi_fast.compat.unused_scvi_tools_heads`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = scvi_tools_state(model)
    state["pyro_param_store"] = {"params": {}, "constraints": {}}
    arch = model.init_params_
    n_obs = 0
    if model.adata is not None:
        n_obs = int(getattr(model.adata, "n_obs", 0) or getattr(model.adata, "n_cells", 0) or 0)
    history = dict(model.history) or None
    attr_dict = {
        "get_normalized_function_name_": "get_normalized_expression",
        "history_": history,
        "init_params_": {
            "kwargs": {"kwargs": _covariate_kwargs(model)},
            "non_kwargs": {
                "n_hidden": int(arch["n_hidden"]),
                "n_latent": int(arch["n_latent"]),
                "n_layers": int(arch["n_layers"]),
                "dropout_rate": float(arch["dropout_rate"]),
                "dispersion": str(arch["dispersion"]),
                "gene_likelihood": str(arch["gene_likelihood"]),
                "use_observed_lib_size": bool(arch["use_observed_lib_size"]),
                "latent_distribution": str(arch["latent_distribution"]),
            },
        },
        "is_trained_": bool(model.is_trained),
        "registry_": scvi_tools_registry(model, n_obs),
        "test_indices_": np.array([], dtype=np.int64),
        "train_indices_": None if model.train_indices is None else np.asarray(model.train_indices),
        "validation_indices_": (
            None if model.validation_indices is None else np.asarray(model.validation_indices)
        ),
    }
    out = {
        "model_state_dict": state,
        "var_names": np.asarray(list(model.registry.var_names), dtype=object),
        "attr_dict": attr_dict,
    }
    path = folder / "model.pt"
    torch.save(out, path)
    return path
