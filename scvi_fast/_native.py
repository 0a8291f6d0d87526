"""Lazy, cached loading of the compiled CPU extension.

Two ways to get it, tried in this order on first use:

1. ``scvi_fast._C``, built by ``setup.py`` when torch is importable at build
   time (``pip install --no-build-isolation -e .``);
2. a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load``
   (needs a C++ compiler with OpenMP and ninja; about a minute, once per torch
   version). The build folder is ``$SCVI_FAST_BUILD_DIR`` if set, else
   ``~/.cache/scvi_fast/torch_extensions/<python>-<torch>``.

Nothing is compiled or imported at ``import scvi_fast``. If both ways fail,
:func:`load` raises an ImportError that says why and how to get the fast path;
the pure-PyTorch references keep working either way.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

_SOURCES = ("ops.cpp", "kernels_generic.cpp", "kernels_avx2.cpp")
_HEADERS = ("kernels.h", "kernels_impl.h", "likelihood_impl.h", "kernels_instantiate.inc")
_EXT_NAME = "scvi_fast_native"
# -fno-trapping-math lets the kernels' branch-free selects vectorise;
# -fno-math-errno lets sqrt and friends inline. Neither changes results.
_CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def source_dir() -> Path | None:
    """The folder holding the C++ sources: ``csrc/`` of a source checkout, or the
    copy that ``setup.py`` ships inside the package; None if neither exists."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if all((candidate / f).is_file() for f in _SOURCES + _HEADERS):
            return candidate
    return None


def source_hash(folder: Path) -> str:
    """Digest of the C++ sources and flags: a prebuilt ``scvi_fast._C`` built from
    other sources than those beside it (a stale in-place build) is not used."""
    h = hashlib.sha256(" ".join(_CFLAGS).encode())
    for name in _SOURCES + _HEADERS:
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def _prebuilt() -> ModuleType | None:
    try:
        from scvi_fast import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    src = source_dir()
    if src is not None and getattr(_C, "SOURCE_HASH", None) != source_hash(src):
        return None
    return _C


def build_dir() -> Path:
    """Where just-in-time builds go (one sub-folder per Python and torch version)."""
    import torch

    env = os.environ.get("SCVI_FAST_BUILD_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(cache) / "scvi_fast" / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return root / tag.replace("+", "_")


def _jit_build(verbose: bool = False) -> ModuleType:
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise ImportError("the C++ sources (csrc/) are not shipped with this installation")
    # one folder per source digest: checkouts or versions with other sources never share (or
    # race on) a build, and a header-only change can never reuse a stale module
    out = build_dir() / source_hash(src)
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=_EXT_NAME,
        sources=[str(src / f) for f in _SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        extra_include_paths=[str(src)],
        build_directory=str(out),
        verbose=verbose,
    )


def load(verbose: bool = False) -> ModuleType:
    """The compiled extension module, building it on first call if needed.

    Raises
    ------
    ImportError
        If neither a prebuilt ``scvi_fast._C`` nor a just-in-time build is
        available; the message gives the reason and the fix. The failure is
        cached: later calls raise at once.
    """
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise ImportError(_error)
        _module = _prebuilt()
        if _module is not None:
            return _module
        try:
            _module = _jit_build(verbose=verbose)
            return _module
        except Exception as exc:  # compiler errors surface as several types
            reason = f"{type(exc).__name__}: {exc}".strip()
            if len(reason) > 4000:
                reason = reason[:2000] + "\n...\n" + reason[-2000:]
            _error = (
                "the scvi_fast native CPU extension could not be loaded or built "
                f"({reason}). To get the fast path, either install with the extension "
                "prebuilt (`pip install --no-build-isolation -e .` with torch already "
                "installed) or make a C++17 compiler with OpenMP (g++) and ninja "
                "available for the just-in-time build (set SCVI_FAST_BUILD_DIR to "
                "choose its cache folder). impl='torch' works without it."
            )
            raise ImportError(_error) from exc


def is_available() -> bool:
    """True if the extension loads (triggers the cached build on first call)."""
    try:
        load()
    except ImportError:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False, or None when the extension loads."""
    try:
        load()
    except ImportError as exc:
        return str(exc)
    return None
