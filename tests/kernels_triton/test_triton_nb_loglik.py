"""Fused softmax + NB log-likelihood (Triton) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import seed_of
from scvi_fast import functional, reference
from scvi_fast.reference._accuracy import assert_accurate, nb_term_magnitudes
from scvi_fast.reference._random import CSR, random_csr

OP = "nb_softmax_loglik"

# (B, G, density, max count, empty rows, genes never observed)
CASES = [
    (8, 300, 0.15, 5000, (3,), (0, 1, 150)),
    (3, 37, 0.3, 200, (), (5,)),
    (1, 1, 1.0, 50, (), ()),
    (4, 1100, 0.05, 100000, (0,), ()),  # more than one gene block and one non-zero block
]


def _inputs(gen, case, dtype, device):
    B, G, density, max_count, empty_rows, unobserved = case
    index_dtype = torch.int32 if B % 2 else torch.int64  # both index widths
    indptr, indices, values = random_csr(
        gen, B, G, density, max_count=max_count, dtype=dtype, index_dtype=index_dtype,
        empty_rows=empty_rows, empty_cols=unobserved,
    )
    if values.numel():
        values[0] = 2.0**24  # the largest count that float32 holds exactly (and all below it)
    rowsum = torch.zeros(B, dtype=torch.float64).index_add_(
        0, reference.csr_row_ids(indptr, values.numel()), values.double()
    )
    logits = torch.randn(B, G, generator=gen, dtype=torch.float64) * 2
    noise = 0.1 * torch.randn(B, generator=gen, dtype=torch.float64)
    log_library = torch.log(rowsum.clamp_min(1.0)) + noise
    # theta from ~1e-4 (px_r = -9) to ~4e5 (px_r = 13), mostly around 1
    px_r = torch.randn(G, generator=gen, dtype=torch.float64) * 2
    px_r[: min(G, 2)] = torch.tensor([-9.0, 13.0])[: min(G, 2)]
    floats = [t.to(device=device, dtype=dtype) for t in (logits, log_library, px_r)]
    return floats, CSR(indptr, indices, values).to(device)


def _run(fn, floats, csr, w, eps=1e-8):
    leaves = [t.detach().clone().requires_grad_(True) for t in floats]
    ll = fn(leaves[0], leaves[1], leaves[2], csr, eps)
    grads = torch.autograd.grad((ll * w).sum(), leaves)
    return [ll.detach()] + list(grads)


def _check(got, floats, csr, w, dtype, what=""):
    """``got`` (value and gradients) against the float64 reference on the same inputs."""
    floats64 = [t.double() for t in floats]
    csr64 = csr.to(dtype=torch.float64)
    truth = _run(reference.nb_softmax_loglik, floats64, csr64, w.double())
    scales = nb_term_magnitudes(*floats64, csr64, w)
    for g, t, s, n in zip(got, truth, scales, ["loglik", "dlogits", "dlog_library", "dpx_r"]):
        assert g.dtype == dtype, f"{what} {n}"
        assert_accurate(OP, g, t, f"{what} {n}", scale=s)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(tk, device, poison_empty, case, dtype):
    gen = torch.Generator().manual_seed(seed_of(case[:2], dtype))
    floats, csr = _inputs(gen, case, dtype, device)
    w = torch.randn(case[0], generator=gen, dtype=torch.float64).to(device, dtype)
    _check(_run(tk.nb_softmax_loglik, floats, csr, w), floats, csr, w, dtype)


def test_partial_grads_shapes_and_dispatch(tk, device):
    """(B, 1) library, a torch CSR tensor as input, gradient to the logits only, and the
    functional API with impl="triton"."""
    gen = torch.Generator().manual_seed(7)
    floats, (indptr, indices, values) = _inputs(gen, CASES[1], torch.float64, device)
    logits, log_library, px_r = floats
    X = torch.sparse_csr_tensor(indptr, indices, values, size=logits.shape, check_invariants=True)
    logits.requires_grad_(True)
    ll = functional.nb_softmax_loglik(logits, log_library[:, None], px_r, X, impl="triton")
    ll_ref = reference.nb_softmax_loglik(logits, log_library[:, None], px_r, X)
    assert ll.shape == (logits.shape[0],)
    w = torch.randn(ll.shape, generator=gen, dtype=torch.float64).to(device)
    scales = nb_term_magnitudes(*floats, (indptr, indices, values), w)
    assert_accurate(OP, ll, ll_ref, "loglik", scale=scales[0])
    (g,) = torch.autograd.grad((ll * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ll_ref * w).sum(), logits)
    assert_accurate(OP, g, g_ref, "dlogits", scale=scales[1])


def test_other_eps(tk, device):
    gen = torch.Generator().manual_seed(11)
    floats, csr = _inputs(gen, CASES[1], torch.float64, device)
    w = torch.randn(CASES[1][0], generator=gen, dtype=torch.float64).to(device)
    scales = nb_term_magnitudes(*floats, csr, w, eps=1e-3)
    for g, r, s in zip(
        _run(tk.nb_softmax_loglik, floats, csr, w, eps=1e-3),
        _run(reference.nb_softmax_loglik, floats, csr, w, eps=1e-3),
        scales,
    ):
        assert_accurate(OP, g, r, "eps=1e-3", scale=s)


def test_bad_input(tk, device):
    logits = torch.zeros(2, 3, device=device)
    csr = (torch.tensor([0, 0, 0], device=device), torch.zeros(0, dtype=torch.long, device=device),
           torch.zeros(0, device=device))
    zeros = lambda n: torch.zeros(n, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="px_r"):
        tk.nb_softmax_loglik(logits, zeros(2), zeros(4), csr)
    with pytest.raises(ValueError, match="log_library"):
        tk.nb_softmax_loglik(logits, zeros(3), zeros(3), csr)


# every launch shape of the forward and backward at a small G: whole rows from registers or
# in steps, and rows split into 2 or 3 chunks (G = 300 -> chunks of 128 or 256)
FORCED = [
    ("nb_fwd", dict(CHUNK=512, BLOCK_G=128, BLOCK_NZ=16, num_warps=4)),
    ("nb_fwd", dict(CHUNK=128, BLOCK_G=128, BLOCK_NZ=16, num_warps=4)),
    ("nb_fwd", dict(CHUNK=256, BLOCK_G=64, BLOCK_NZ=32, num_warps=4)),
    ("nb_bwd_dense", dict(BLOCK_B=2, BLOCK_G=64, num_warps=4)),
    ("nb_bwd_sparse", dict(BLOCK_NZ=16, num_warps=4)),
]


@pytest.mark.parametrize("kernel, config", FORCED, ids=lambda v: str(v))
def test_every_launch_shape(tk, device, poison_empty, kernel, config):
    from scvi_fast.kernels.triton._configs import forced

    case = CASES[0]
    gen = torch.Generator().manual_seed(seed_of(kernel, sorted(config.items())))
    floats, csr = _inputs(gen, case, torch.float32, device)
    w = torch.randn(case[0], generator=gen, dtype=torch.float64).to(device, torch.float32)
    with forced(kernel, config):
        got = _run(tk.nb_softmax_loglik, floats, csr, w)
    _check(got, floats, csr, w, torch.float32, f"{kernel} {config}:")


@pytest.mark.parametrize("deterministic", [False, True])
def test_padded_tail_changes_nothing(tk, device, deterministic):
    """A poisoned tail past indptr[-1] changes no output or gradient, bit for bit (except the
    order of the per-gene atomic adds of the px_r gradient on a GPU), with the per-gene atomic
    adds and with the deterministic per-entry path."""
    case = CASES[0]
    gen = torch.Generator().manual_seed(seed_of("pad", deterministic))
    floats, csr = _inputs(gen, case, torch.float32, device)
    w = torch.randn(case[0], generator=gen).to(device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        want = _run(tk.nb_softmax_loglik, floats, csr, w)
        got = _run(tk.nb_softmax_loglik, floats, csr.padded(6, case[1]), w)
    finally:
        torch.use_deterministic_algorithms(before)
    for i, (g, t) in enumerate(zip(got, want)):
        if i == 3 and device.type == "cuda" and not deterministic:
            assert_accurate("nb_px_r_order", g, t, "dpx_r")
        else:
            assert torch.equal(g, t), f"output {i}"


def test_deterministic_path_matches_atomic_path(tk, device):
    case = CASES[3]
    gen = torch.Generator().manual_seed(21)
    floats, csr = _inputs(gen, case, torch.float64, device)
    w = torch.randn(case[0], generator=gen, dtype=torch.float64).to(device)
    atomic = _run(tk.nb_softmax_loglik, floats, csr, w)
    torch.use_deterministic_algorithms(True)
    try:
        det = _run(tk.nb_softmax_loglik, floats, csr, w)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, d in zip(atomic, det):
        assert_accurate("nb_px_r_order", a, d)


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"{c[0]}x{c[1]}")
def test_bf16_logits_read_directly(tk, device, case):
    """bfloat16 logits: float32 log-likelihood as accurate as for the same (rounded) logits in
    float32; the logits' gradient in bfloat16, within its rounding of the float32 one."""
    gen = torch.Generator().manual_seed(seed_of("bf16", case[:2]))
    floats, csr = _inputs(gen, case, torch.float32, device)
    floats[0] = floats[0].to(torch.bfloat16)
    w = torch.randn(case[0], generator=gen).to(device)
    got = _run(tk.nb_softmax_loglik, floats, csr, w)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    assert got[2].dtype == got[3].dtype == torch.float32
    floats64 = [t.double() for t in floats]
    csr64 = csr.to(dtype=torch.float64)
    truth = _run(reference.nb_softmax_loglik, floats64, csr64, w.double())
    scales = nb_term_magnitudes(*floats64, csr64, w)
    for i, (g, t, s) in enumerate(zip(got, truth, scales)):
        # the bf16 gradient of the logits takes the table's "bfloat16" entry (one rounding)
        assert_accurate(OP, g, t, f"output {i}", scale=s)


def test_functional_keeps_bf16_logits_for_triton_only(device):
    """functional.nb_softmax_loglik_linear under bf16 autocast: the Triton back-end gets the
    bf16 logits, the reference evaluates them in float32; both return float32."""
    gen = torch.Generator().manual_seed(4)
    B, G, H = 5, 40, 6
    floats, csr = _inputs(gen, (B, G, 0.3, 100, (), ()), torch.float32, device)
    _, lib, px_r = floats
    h = torch.randn(B, H, generator=gen).to(device)
    W = (torch.randn(G, H, generator=gen) / H**0.5).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        lt = functional.nb_softmax_loglik_linear(h, W, None, lib, px_r, csr, impl="triton")
        lr = functional.nb_softmax_loglik_linear(h, W, None, lib, px_r, csr, impl="torch")
        logits = torch.nn.functional.linear(h, W)
    assert logits.dtype == torch.bfloat16
    assert lt.dtype == lr.dtype == torch.float32
    # the Triton result is the float64 likelihood of those bf16 logits, to float32 accuracy
    truth = reference.nb_softmax_loglik(logits.double(), lib.double(), px_r.double(),
                                        csr.to(dtype=torch.float64))
    w = torch.ones(B, dtype=torch.float64, device=device)
    scale = nb_term_magnitudes(logits, lib, px_r, csr, w)[0]
    assert_accurate(OP, lt, truth, "loglik", scale=scale)


def test_every_candidate_configuration(tk, device):
    """Each candidate a sweep or SCVI_FAST_AUTOTUNE=1 may pick gives the right answer."""
    from scvi_fast.kernels.triton import _nb_bwd as bwd
    from scvi_fast.kernels.triton import _nb_fwd as fwd
    from scvi_fast.kernels.triton._configs import forced

    case = CASES[3]  # 4 x 1100: more than one block of genes
    G = case[1]
    gen = torch.Generator().manual_seed(17)
    floats, csr = _inputs(gen, case, torch.float32, device)
    w = torch.randn(case[0], generator=gen).to(device)
    runs = [("nb_fwd", c) for c in fwd.fwd_candidates(G, torch.float32)]
    runs += [("nb_bwd_dense", c) for c in bwd.bwd_dense_candidates(G, torch.float32)]
    runs += [("nb_bwd_sparse", c) for c in bwd.bwd_sparse_candidates(torch.float32)]
    for kernel, config in runs:
        with forced(kernel, config):
            got = _run(tk.nb_softmax_loglik, floats, csr, w)
        _check(got, floats, csr, w, torch.float32, f"{kernel} {config}:")
