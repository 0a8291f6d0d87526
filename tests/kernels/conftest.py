"""Fixtures of the kernel tests: seeded generators, poisoned heap blocks, the ISA switch.

Random count batches come from :func:`scvi_fast.reference._random.random_csr` and tolerances
from :mod:`scvi_fast.reference._accuracy`, shared with the Triton and model tests and with
``benchmarks/gpu_check_kernels.py``.
"""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per test, reproducible runs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def poison_heap(*shapes, dtype=torch.float32) -> None:
    """Allocate NaN-filled blocks of the given shapes and free them.

    The kernels allocate their outputs with ``empty``; freeing NaN-filled blocks of
    the same sizes just before a call makes it likely that the allocator hands the
    same memory back, so an output element the kernel forgets to write shows up
    as NaN instead of as a lucky zero.
    """
    blocks = [torch.full(s, float("nan"), dtype=dtype) for s in shapes]
    del blocks


@pytest.fixture(scope="session")
def native_ext():
    """The compiled extension: a failed build fails the tests (never skips them)."""
    from scvi_fast import _native

    return _native.load()


def _isas():
    import platform

    return ["auto", "generic"] if platform.machine() in ("x86_64", "AMD64") else ["auto"]


@pytest.fixture(params=_isas())
def isa(request, native_ext):
    """Run a test with the automatically chosen kernels and with the baseline build."""
    native_ext.set_isa(request.param)
    yield request.param
    native_ext.set_isa("auto")
