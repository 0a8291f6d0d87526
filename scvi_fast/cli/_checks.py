"""The command line's argument types and input/output checks: every mistake is found before
any work starts and reported in one line with exit status 2 (see :mod:`scvi_fast.cli`)."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path


class UsageError(ValueError):
    """A command line that cannot run as given (reported in one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (and exits 2), without the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument types --
def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    return parse


_positive = _int_at_least(1, "positive")
_non_negative = _int_at_least(0, "0 or more")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _leiden_iterations(text: str) -> int:
    value = _int_at_least(-1, "-1 or more")(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 passes do nothing: give -1 (until stable) or 1 or more")
    return value


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, present on this machine."""
    if text in ("auto", "cpu"):
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda, "
                                         "cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise argparse.ArgumentTypeError(f"{text!r}: no GPU is available here ({why}); use "
                                             "--device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
    return text


# ------------------------------------------------------------------ input, output --
def _existing(path: str | None, what: str = "input") -> None:
    if path is not None and not Path(path).exists():
        raise UsageError(f"{what} {path} does not exist")


def _writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and check a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {flag} {folder}: {err.strerror or err}") from None


def _model_format(path: Path) -> str | None:
    """``"scvi_fast"`` or ``"scvi-tools"`` when ``path`` is a model folder, else None."""
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        try:
            if json.loads((path / "config.json").read_text()).get("format") == "scvi_fast":
                return "scvi_fast"
        except (OSError, ValueError, AttributeError):
            pass
        return None
    if (path / "model.pt").is_file():
        return "scvi-tools"
    return None


def _replaceable(dest: Path, overwrite: bool, recognise, what: str) -> None:
    from scvi_fast.data import check_destination

    try:
        check_destination(dest, overwrite, recognise, what, flag="--overwrite")
    except FileExistsError as err:
        raise UsageError(str(err)) from None


def _is_model(path: Path) -> bool:
    return _model_format(path) is not None


def _is_file(path: Path) -> bool:
    return path.is_file()


def _read_input(path: str, backed: bool = False):
    """An AnnData from ``.h5ad`` (or a CSR store folder, returned as a path)."""
    p = Path(path)
    if p.is_dir():
        return str(p)
    if p.suffix == ".h5ad":
        import anndata

        return anndata.read_h5ad(p, backed="r" if backed else None)
    raise UsageError(f"unsupported input {path!r}: give an .h5ad file or a CSR store folder")
