"""Inputs and tolerances shared by the Triton kernel tests."""

from __future__ import annotations

import importlib.util
import os
import zlib

import torch

ON_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")
#: run the test_triton_*.py modules in this process (else in a subprocess with the interpreter)
RUN_HERE = ON_GPU or INTERPRET
try:
    HAS_TRITON = importlib.util.find_spec("triton") is not None
except ValueError:  # in sys.modules without a spec
    HAS_TRITON = True

# (op, dtype) -> (atol, rtol) for float64 comparisons against the float64 reference, and
# (op, "float32") -> (factor, floor) for float32: the kernel's error against the float64 truth
# must stay within ``factor`` times torch's own float32 error plus ``floor`` (DESIGN habit 5).
TOL = {
    # float64: the same formulas summed in another order (per-lane partial sums, tiles, CSC
    # segments instead of torch's pairwise sums); rounding differences stay ~1e-15 relative.
    ("sparse_linear", torch.float64): (1e-12, 1e-12),
    ("reparam_kl", torch.float64): (1e-12, 1e-12),
    # NB, both dtypes: its sums cancel terms of very different size (lgamma differences at
    # counts up to 2^24, theta (log theta - log(theta + mu)) at theta ~ 4e5), so the error is
    # bounded elementwise by k * (sum of the absolute values of the terms), the classical forward
    # error bound of a sum (kappa * u). float64: u = 1.1e-16 and the plain-Triton lgamma /
    # digamma are ~1e-14 relative: k = 5e-13 (~4500 u); measured <= 1e-13. float32:
    # u = 6e-8, measured <= 5e-7 for the kernel and for torch's own float32: k = 2e-6 (~30 u).
    ("nb", torch.float64): (0.0, 5e-13),
    ("nb", "float32"): (0.0, 2e-6),
    # float32: the kernels accumulate in float32 like torch, log1p via Goldberg's identity and a
    # different summation order: within 4x of torch's own float32 error.
    ("sparse_linear", "float32"): (4.0, 1e-6),
    ("reparam_kl", "float32"): (4.0, 1e-6),
    # the whole VAE (fixture models, 8 cells): float64 compared to max(1, max |value|) of each
    # gradient, since many entries are sums that cancel to ~0 (a few ulp of the largest term);
    # float32 as for the ops, against torch's own float32 error.
    ("model", torch.float64): (1e-10, 1e-9),
    ("model", "float32"): (4.0, 1e-6),
    # special functions in float64, relative to max(1, |value|)
    ("lgamma", torch.float64): (0.0, 5e-14),
    ("digamma", torch.float64): (0.0, 5e-15),
    # float32 special functions, against the float64 value at the same float32 argument:
    # lgamma's absolute error ~3 ulp of ~22 after the shift (cancellation near its roots 1, 2);
    # digamma's within 2x of torch's float32 digamma.
    ("lgamma", "float32"): (0.0, 1e-5),
    ("digamma", "float32"): (0.0, 2e-6),
}


def assert_close64(actual, expected, op, what=""):
    atol, rtol = TOL[(op, torch.float64)]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_within_torch32(actual32, torch32, truth64, op, what=""):
    """float32 result vs the float64 truth, judged against torch's float32 error."""
    factor, floor = TOL[(op, "float32")]
    assert actual32.dtype == torch.float32, what
    assert torch.isfinite(actual32).all(), f"{what}: non-finite values"
    err = (actual32.double() - truth64).abs().max().item() if truth64.numel() else 0.0
    ref_err = (torch32.double() - truth64).abs().max().item() if truth64.numel() else 0.0
    scale = truth64.abs().max().item() if truth64.numel() else 0.0
    bound = factor * ref_err + floor * max(scale, 1.0)
    assert err <= bound, (
        f"{what}: error {err:.3g} > {bound:.3g} (torch float32 error {ref_err:.3g})"
    )


def assert_within_scale(actual, truth64, scale, op, dtype, what=""):
    """``|actual - truth| <= k * scale`` elementwise, ``k`` from ``TOL[(op, dtype)]``."""
    k = TOL[(op, torch.float64 if dtype == torch.float64 else "float32")][1]
    assert actual.dtype == dtype, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - truth64).abs()
    bound = k * scale + 1e-300
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error reaches {worst:.3g} x the bound {k:g} * scale"


def seed_of(*params) -> int:
    """A seed per test case, stable across processes (``hash`` of a str is salted per run)."""
    return zlib.crc32(repr(params).encode())


def random_csr(
    gen: torch.Generator,
    B: int,
    G: int,
    density: float,
    dtype=torch.float32,
    index_dtype=torch.int64,
    max_count: int = 1000,
    empty_rows=(),
    unobserved_genes=(),
):
    """A canonical CSR count matrix (sorted, unique genes per row) with heavy-tailed counts.

    ``empty_rows`` get no non-zeros and ``unobserved_genes`` appear in no row.
    """
    mask = torch.rand(B, G, generator=gen) < density
    # heavy tail: most counts small, some in the thousands
    log_max = torch.log(torch.tensor(max_count + 1.0))
    counts = torch.floor(torch.exp(torch.rand(B, G, generator=gen) * log_max))
    counts = counts.clamp_min(1)
    dense = torch.where(mask, counts, torch.zeros(()))
    for r in empty_rows:
        dense[r] = 0
    for g in unobserved_genes:
        dense[:, g] = 0
    rows, cols = dense.nonzero(as_tuple=True)
    indptr = torch.zeros(B + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=B), 0)
    return indptr.to(index_dtype), cols.to(index_dtype), dense[rows, cols].to(dtype)


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]
