"""Checking saved tensors against a module before they are loaded into it.

``nn.Module.load_state_dict`` casts dtypes silently and reports shape errors in its own terms;
a damaged or mismatched model or checkpoint should instead be refused with one clear message
that names the tensor, before anything is loaded.
"""

from __future__ import annotations

import zlib

import torch


class StateMismatchError(ValueError):
    """Saved tensors that do not fit the module they are loaded into."""


def check_state(module: torch.nn.Module, state: dict, what: str, finite: bool = True) -> None:
    """Raise :class:`StateMismatchError` unless ``state`` fits ``module.state_dict()`` exactly.

    Checks, in order, and names the first offending tensor: missing and unexpected keys, shape,
    dtype (the module's own; a cast would hide a damaged file), and, with ``finite``, NaN or
    infinite values in floating tensors. ``what`` names the source in the message (e.g.
    ``"the model in run1/model"``).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise StateMismatchError(
            f"{what} does not match this model's architecture: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
               if unexpected else "")
            + ". Was it saved by a model with other settings (n_layers, batches, genes)?"
        )
    for name, ref in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor):
            raise StateMismatchError(f"{what}: {name!r} is not a tensor ({type(got).__name__})")
        if tuple(got.shape) != tuple(ref.shape):
            raise StateMismatchError(
                f"{what} does not match this model's architecture: {name!r} has shape "
                f"{tuple(got.shape)}, the model's is {tuple(ref.shape)} (different n_hidden, "
                "n_latent, genes or batches?)"
            )
        if got.dtype != ref.dtype:
            raise StateMismatchError(
                f"{what}: {name!r} is stored as {got.dtype}, the model's is {ref.dtype}; the "
                "file is damaged or was not written by this package"
            )
        if finite and got.is_floating_point() and not bool(torch.isfinite(got).all()):
            n_bad = int((~torch.isfinite(got)).sum())
            raise StateMismatchError(
                f"{what}: {name!r} holds {n_bad} NaN or infinite values; the weights are "
                "damaged (or were saved from a run that diverged)"
            )


def tensor_crc32(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes (CPU, contiguous; any dtype), as 8 hex digits."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(raw) & 0xFFFFFFFF:08x}"


def state_checksums(state: dict) -> dict[str, str]:
    """:func:`tensor_crc32` of every tensor of ``state``."""
    return {k: tensor_crc32(v) for k, v in state.items()}


def verify_checksums(state: dict, checksums: dict[str, str], what: str) -> None:
    """Raise :class:`StateMismatchError` naming the first tensor of ``state`` whose bytes do
    not match ``checksums`` (or that is missing or extra)."""
    if set(state) != set(checksums):
        odd = sorted(set(state) ^ set(checksums))
        raise StateMismatchError(f"{what}: the stored tensors do not match their checksum list "
                                 f"({odd[:5]}); the file is damaged or incomplete")
    for k, v in state.items():
        if tensor_crc32(v) != checksums[k]:
            raise StateMismatchError(
                f"{what}: tensor {k!r} is damaged (its checksum does not match the one saved "
                "with it); restore the file from a copy or retrain"
            )
