"""The native extension builds (or loads) and reports what it runs with."""

from __future__ import annotations

import importlib
import subprocess
import sys

from scvi_fast import _native
from scvi_fast.kernels import native


def test_extension_is_available():
    # In CI a failed build must fail here, with the compiler's reason, not skip.
    assert native.is_available(), native.unavailable_reason()
    assert native.unavailable_reason() is None
    assert native.load().isa() in ("avx2", "generic")


def test_load_is_cached():
    assert _native.load() is _native.load()


def test_import_builds_nothing():
    """``import scvi_fast`` (and the back-end package) neither compiles nor loads C++."""
    code = (
        "import sys, scvi_fast, scvi_fast.functional, scvi_fast.kernels.native as n;"
        "import scvi_fast._native as m;"
        "assert m._module is None and 'scvi_fast._C' not in sys.modules;"
        "assert not any(k.startswith('scvi_fast_native') for k in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_failed_build_raises_import_error_with_fix(monkeypatch):
    fresh = importlib.reload(_native)
    try:
        monkeypatch.setattr(fresh, "source_dir", lambda: None)
        monkeypatch.setitem(sys.modules, "scvi_fast._C", None)  # no prebuilt extension
        try:
            fresh.load()
        except ImportError as exc:
            msg = str(exc)
        else:  # pragma: no cover
            raise AssertionError("load() should have failed")
        assert "csrc" in msg and "pip install" in msg and "impl='torch'" in msg
        assert not fresh.is_available()
    finally:
        monkeypatch.undo()
        importlib.reload(_native)
