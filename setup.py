"""Build script: the package metadata lives in pyproject.toml.

The C++ CPU kernels (``csrc/``) are compiled into ``scvi_fast._C`` when torch is
importable in the build environment, e.g. ``pip install --no-build-isolation -e .``
with torch already installed. Otherwise (an isolated build, no compiler, or
``SCVI_FAST_NO_EXTENSION=1``) the pure-Python package is installed and
``scvi_fast._native`` compiles the same sources just in time on first use; for
that, non-editable installs ship the sources as ``scvi_fast/_csrc``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

# One list of sources and flags for both build paths: read them from _native.py
# (a plain module; loading it imports no torch).
_spec = importlib.util.spec_from_file_location("_scvi_fast_native_cfg", ROOT / "scvi_fast" / "_native.py")
_cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cfg)


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package so installs can compile it just in time."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ from the source tree
        target = Path(self.build_lib) / "scvi_fast" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for name in _cfg._SOURCES + _cfg._HEADERS:
            shutil.copy2(CSRC / name, target / name)


def _extension_setup() -> dict:
    if os.environ.get("SCVI_FAST_NO_EXTENSION", "") not in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "scvi_fast: torch is not importable in this build environment; installing the "
            "pure-Python package (the CPU kernels compile on first use). Use "
            "`pip install --no-build-isolation .` to build them now.",
            file=sys.stderr,
        )
        return {}

    class OptionalBuildExt(BuildExtension):
        """A failed compile leaves the package usable (just-in-time build later)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors come in several types
                warnings.warn(f"scvi_fast: building the CPU extension failed ({exc}); "
                              "it will be compiled on first use instead")

    ext = CppExtension(
        "scvi_fast._C",
        sources=[str(Path("csrc") / name) for name in _cfg._SOURCES],
        include_dirs=[str(CSRC)],
        define_macros=[("SCVI_FAST_SOURCE_HASH", f'"{_cfg.source_hash(CSRC)}"')],
        extra_compile_args=list(_cfg._CFLAGS),
        extra_link_args=list(_cfg._LDFLAGS),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


_ext = _extension_setup()
setup(
    cmdclass={"build_py": BuildPyWithSources, **_ext.pop("cmdclass", {})},
    **_ext,
)
