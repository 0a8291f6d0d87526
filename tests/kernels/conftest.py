"""Fixtures of the kernel tests: seeded generators, random CSR batches, ISA switch."""

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


def random_counts(
    n_rows: int,
    n_cols: int,
    density: float,
    gen: torch.Generator,
    max_count: float = 5000.0,
    empty_rows: tuple[int, ...] = (),
    empty_cols: tuple[int, ...] = (),
) -> torch.Tensor:
    """Dense float64 counts: log-uniform integers in [1, max_count] at ``density``.

    Most counts are small, as in real data, with a tail up to ``max_count``.
    ``empty_rows`` / ``empty_cols`` are forced to zero (cells without counts,
    genes never observed).
    """
    mask = torch.rand(n_rows, n_cols, generator=gen) < density
    logc = torch.rand(n_rows, n_cols, generator=gen, dtype=torch.float64) * torch.log(
        torch.tensor(max_count, dtype=torch.float64)
    )
    x = torch.where(mask, torch.floor(torch.exp(logc)), torch.zeros((), dtype=torch.float64))
    for r in empty_rows:
        if r < n_rows:
            x[r] = 0
    for c in empty_cols:
        if c < n_cols:
            x[:, c] = 0
    return x


def csr_of(x: torch.Tensor, dtype: torch.dtype, index_dtype: torch.dtype = torch.int64):
    """``(indptr, indices, values)`` of a dense matrix (values cast to ``dtype``)."""
    n_rows, n_cols = x.shape
    if x.numel() == 0:
        return (
            torch.zeros(n_rows + 1, dtype=torch.int64),
            torch.zeros(0, dtype=index_dtype),
            torch.zeros(0, dtype=dtype),
        )
    xs = x.to_sparse_csr()
    return (
        xs.crow_indices().to(torch.int64),
        xs.col_indices().to(index_dtype),
        xs.values().to(dtype),
    )


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
