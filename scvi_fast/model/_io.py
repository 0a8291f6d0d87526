"""Saving and loading models: scvi_fast's own folder format and scvi-tools' ``model.pt``.

Every model built from saved state goes through ``SCVI._from_parts(config, state, registry)``:
``config`` is what :func:`config_of` writes to ``config.json``, ``state`` the tensors of
``model.safetensors`` (``module.*`` and ``passthrough.*``), ``registry`` a
:class:`~scvi_fast.model.Registry`. Native load, the scvi-tools import, query mapping and the
ranks of a data-parallel run all build their models that way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from scvi_fast import data as _data
from scvi_fast.model._registry import Registry
from scvi_fast.module import state_checksums, verify_checksums

FORMAT_VERSION = 1
#: how scvi-tools' category mappings are written to ``config.json`` (dtype and values)
_MAPPING_KEYS = ("dtype", "values")


def encode_mappings(mappings: dict[str, np.ndarray]) -> dict:
    """scvi-tools' category mappings as JSON: ``{field: {"dtype": ..., "values": [...]}}``."""
    return {f: {"dtype": str(np.asarray(m).dtype), "values": np.asarray(m).tolist()}
            for f, m in mappings.items()}


def decode_mappings(mappings: dict | None) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_mappings` (arrays pass through as they are)."""
    out = {}
    for f, m in (mappings or {}).items():
        if isinstance(m, dict) and set(m) == set(_MAPPING_KEYS):
            dtype = object if m["dtype"] in ("object", "O") else np.dtype(m["dtype"])
            out[f] = np.asarray(m["values"], dtype=dtype)
        else:
            out[f] = np.asarray(m)
    return out


def config_of(model) -> dict:
    """What ``config.json`` holds: architecture, registry, training record, export metadata."""
    return {
        "format": "scvi_fast",
        "format_version": FORMAT_VERSION,
        "init_params": dict(model.init_params_),
        "registry": model.registry.to_dict(),
        "is_trained": model.is_trained_,
        "history": model.history_,
        "train_params": model.train_params_,
        "scvi_tools_mappings": encode_mappings(model.scvi_tools_mappings),
    }


def state_of(model) -> dict:
    """The tensors ``model.safetensors`` holds (CPU, contiguous)."""
    out = {f"module.{k}": v for k, v in model.module.state_dict().items()}
    out.update({f"passthrough.{k}": v for k, v in model.passthrough.items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save(model, dir_path, overwrite: bool, save_anndata: bool, format: str) -> None:
    """``model.save``: written beside ``dir_path``, then renamed into place."""
    dir_path = Path(dir_path)
    if format not in ("scvi_fast", "scvi-tools"):
        raise ValueError(f"format must be 'scvi_fast' or 'scvi-tools'; got {format!r}")
    if dir_path.exists() and not overwrite:
        raise FileExistsError(f"{dir_path} exists; pass overwrite=True to replace it")
    dir_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dir_path.parent, prefix=f".{dir_path.name}."))
    try:
        if format == "scvi_fast":
            from safetensors.torch import save_file

            state = state_of(model)
            save_file(state, str(tmp / "model.safetensors"))
            config = config_of(model) | {"checksums": state_checksums(state)}
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
        else:
            from scvi_fast.compat import save_scvi_tools

            save_scvi_tools(model, tmp)
        if save_anndata and model.adata is not None and hasattr(model.adata, "write_h5ad"):
            _data.write_h5ad(model.adata, tmp / "adata.h5ad")
        _replace_folder(tmp, dir_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(new: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old)


def check_load_options(**options) -> None:
    """scvi-tools ``load`` options scvi_fast has no use for: refused when given."""
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise NotImplementedError(f"SCVI.load does not support {given}: load a folder written by "
                                  "save() (scvi_fast's or scvi-tools' model.pt, no prefix)")


def read_parts(dir_path) -> tuple[dict, dict, Registry]:
    """``(config, state, registry)`` of a model folder, scvi_fast's or scvi-tools'."""
    dir_path = Path(dir_path)
    if (dir_path / "config.json").exists() and (dir_path / "model.safetensors").exists():
        return _read_native(dir_path)
    if (dir_path / "model.pt").exists():
        from scvi_fast.compat import read_scvi_tools_folder

        got = read_scvi_tools_folder(dir_path)
        return got["config"], got["state"], Registry.from_dict(got["registry"])
    raise FileNotFoundError(
        f"{dir_path} holds neither an scvi_fast model (config.json + model.safetensors) "
        "nor an scvi-tools model (model.pt)"
    )


def _read_native(dir_path: Path) -> tuple[dict, dict, Registry]:
    from safetensors.torch import load_file

    try:
        cfg = json.loads((dir_path / "config.json").read_text())
        tensors = load_file(str(dir_path / "model.safetensors"))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{dir_path} is not a readable scvi_fast model: {err}") from err
    if cfg.get("format") != "scvi_fast" or cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{dir_path}/config.json is not a supported scvi_fast model config")
    what = f"the model in {dir_path}"
    if "checksums" in cfg:
        verify_checksums(tensors, cfg["checksums"], what)
    else:
        warnings.warn(f"{what} was saved without checksums (an older version): its tensors "
                      "cannot be verified; save it again to add them", stacklevel=3)
    cfg["origin"] = what
    return cfg, tensors, Registry.from_dict(cfg["registry"])


def saved_anndata(dir_path):
    """The AnnData saved beside a model (``save_anndata=True``), or None."""
    path = Path(dir_path) / "adata.h5ad"
    if not path.exists():
        return None
    import anndata

    return anndata.read_h5ad(path)
