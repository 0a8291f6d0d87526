"""Host-side helpers shared by the Triton launchers (no kernels here)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NULL = contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype):
    """Accumulation dtype inside a kernel: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensors(op: str, interpreted: bool, **tensors: torch.Tensor | None) -> None:
    """Raise a clear error when a tensor cannot be handed to a Triton kernel here.

    ``interpreted``: whether the calling kernel file was decorated under the interpreter.
    """
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        names = {k: str(t.device) for k, t in tensors.items() if t is not None}
        raise ValueError(f"{op}: all tensors must be on one device; got {names}")
    (device,) = devices
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreted:
        return
    raise RuntimeError(
        f"{op} (impl='triton') needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is first imported in the process; got tensors on {device}"
    )


def on_device(t: torch.Tensor):
    """Make ``t``'s GPU the current one while launching: Triton launches on the current
    device, not on the tensors' (the autograd engine already does this for backward).
    Nothing to switch (the usual case) costs one device query."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NULL


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating-point tensor; got {t.dtype}")


def block_size(n: int, cap: int, floor: int = 16) -> int:
    """Power-of-two block covering ``n`` (at least ``floor``), capped at ``cap``."""
    return max(floor, min(cap, triton.next_power_of_2(max(n, 1))))
