"""Checkpoints written atomically, read without unpickling arbitrary objects, and verified.

:func:`atomic_torch_save` records, beside a dict's contents, the CRC-32 (with dtype and shape)
of every tensor in it and one CRC-32 of everything else (epoch, step, history, ...);
:func:`load_checkpoint` reads with ``weights_only=True`` and refuses, with the tensor named, a
checkpoint whose contents fail those checksums, that holds non-finite weights or optimiser
state, or (given the module to resume) that was written for another architecture. A
checkpoint written before checksums existed still loads, with a warning.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from scvi_fast.module import tensor_crc32

#: the entry of a saved dict that holds its checksums
CHECKSUM_KEY = "_checksums"
_ADVICE = ("Delete it (or pass resume=False, or another checkpoint_dir) to train from scratch, "
           "or resume from a copy you trust.")


class CheckpointError(RuntimeError):
    """A training checkpoint cannot be used: unreadable, damaged, non-finite, or written for
    another model."""


def _leaves(obj, path: str = "") -> Iterator[tuple[str, object]]:
    """``(path, value)`` of every tensor and plain value in nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not path and k == CHECKSUM_KEY:
                continue
            yield from _leaves(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}/{i}")
    else:
        yield path, obj


def _tensor_crc(t: torch.Tensor) -> int:
    return int(tensor_crc32(t), 16)


def checksums(obj: dict) -> dict:
    """The checksum record of ``obj``: per tensor ``[crc32, dtype, shape]``, plus one CRC-32
    over the ``repr`` of every other value with its path."""
    tensors, others = {}, []
    for path, value in _leaves(obj):
        if isinstance(value, torch.Tensor):
            tensors[path] = [_tensor_crc(value), str(value.dtype), list(value.shape)]
        else:
            others.append(f"{path}={type(value).__name__}:{value!r}")
    return {"algorithm": "crc32", "tensors": tensors,
            "other": zlib.crc32("\n".join(others).encode())}


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename.

    A crash at any point leaves either the previous checkpoint or the new one,
    never a truncated file. A dict is saved with its checksum record (see
    :func:`load_checkpoint`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: checksums(obj)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verify_checkpoint(state: dict, path) -> None:
    """Check ``state`` against its checksum record and refuse non-finite tensors.

    Raises
    ------
    CheckpointError
        Naming the first damaged or non-finite tensor.
    """
    record = state.get(CHECKSUM_KEY)
    if record is None:
        warnings.warn(f"the checkpoint {path} has no checksums (written by an older scvi_fast): "
                      "its contents cannot be verified, only checked for non-finite values",
                      UserWarning, stacklevel=3)
    else:
        got = checksums(state)
        want = record.get("tensors", {}) if isinstance(record, dict) else {}
        for name in want.keys() | got["tensors"].keys():
            if name not in got["tensors"] or name not in want:
                raise CheckpointError(
                    f"the checkpoint {path} is damaged: the tensor {name} is "
                    f"{'missing' if name not in got['tensors'] else 'not in its checksums'}. "
                    + _ADVICE)
        for name, (crc, dtype, shape) in got["tensors"].items():
            if [crc, dtype, shape] != list(want[name]):
                raise CheckpointError(
                    f"the checkpoint {path} is damaged: the tensor {name} ({dtype}, shape "
                    f"{tuple(shape)}) fails its checksum. " + _ADVICE)
        if got["other"] != record.get("other"):
            raise CheckpointError(
                f"the checkpoint {path} is damaged: its non-tensor entries (epoch, step, "
                "history, ...) fail their checksum. " + _ADVICE)
    for name, value in _leaves(state):
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not bool(torch.isfinite(value).all())):
            kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            raise CheckpointError(
                f"the checkpoint {path} holds {kind} values in {name}: refusing to resume from "
                "weights that are not finite. " + _ADVICE)


def check_module_state(module: torch.nn.Module, saved: dict, path) -> None:
    """Refuse saved module weights whose parameter names or shapes differ from ``module``'s.

    Raises
    ------
    CheckpointError
        Naming the first parameter (in the module's order) that is missing, extra or of
        another shape, with both shapes.
    """
    own = module.state_dict()
    why = None
    for name, value in own.items():
        if name not in saved:
            why = f"it has no {name} (shape {tuple(value.shape)} in this model)"
        elif tuple(saved[name].shape) != tuple(value.shape):
            why = (f"{name} has shape {tuple(saved[name].shape)} there and "
                   f"{tuple(value.shape)} in this model")
        if why:
            break
    else:
        extra = [k for k in saved if k not in own]
        if extra:
            why = f"it holds {extra[0]} (shape {tuple(saved[extra[0]].shape)}), which this model lacks"
    if why:
        raise CheckpointError(
            f"the checkpoint {path} was written for another model: {why}. The architecture "
            "(n_hidden, n_latent, n_layers) or the genes and batches differ from the run that "
            "wrote it; resume with the same ones, or start from scratch (resume=False or "
            "another checkpoint_dir)."
        )


def load_checkpoint(path: str | os.PathLike, map_location="cpu",
                    module: torch.nn.Module | None = None) -> dict:
    """Load and verify a training checkpoint (``weights_only=True``: tensors and plain
    containers only).

    Parameters
    ----------
    path
        The checkpoint file.
    map_location
        Passed to :func:`torch.load`.
    module
        The module to be resumed: its parameter names and shapes must match the checkpoint's.

    Raises
    ------
    CheckpointError
        If the file cannot be read, fails its checksums, holds non-finite tensors or does
        not fit ``module``; the message names the file and the tensor.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"could not read the training checkpoint {path}: {err}. Delete it to start "
            "training from scratch, or pass resume=False."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (it holds a "
                              f"{type(state).__name__}). " + _ADVICE)
    verify_checkpoint(state, path)
    state.pop(CHECKSUM_KEY, None)
    if module is not None:
        if not isinstance(state.get("module"), dict):
            raise CheckpointError(f"{path} holds no module weights. " + _ADVICE)
        check_module_state(module, state["module"], path)
    return state
