"""Fused softmax + ZINB and Poisson log-likelihoods (Triton), and the Triton NB op with a
(B, G) dispersion, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import seed_of
from scvi_fast import functional, reference
from scvi_fast.reference._accuracy import (
    assert_accurate,
    nb_term_magnitudes,
    poisson_term_magnitudes,
    zinb_term_magnitudes,
)
from scvi_fast.reference._random import random_csr

ZINB = "zinb_softmax_loglik"
POISSON = "poisson_softmax_loglik"
ZINB_NAMES = ("loglik", "dlogits", "dlog_library", "dpx_r", "ddropout")

# (B, G, density, max count, empty rows, genes never observed)
CASES = [
    (8, 300, 0.15, 5000, (3,), (0, 1, 150)),
    (3, 37, 0.3, 200, (), (5,)),
    (1, 1, 1.0, 50, (), ()),
]


def _inputs(gen, case, dtype, device, rows, pi_scale=3.0, pi_shift=0.0):
    """(logits, log library, px_r, dropout logits) and padded CSR counts; theta from ~1e-4
    (px_r = -9) to ~4e5 (px_r = 13), mostly around 1."""
    B, G, density, max_count, empty_rows, unobserved = case
    csr = random_csr(gen, B, G, density, max_count=max_count, dtype=dtype, pad=5,
                     index_dtype=torch.int32 if B % 2 else torch.int64,
                     empty_rows=empty_rows, empty_cols=unobserved)
    logits = torch.randn(B, G, generator=gen, dtype=torch.float64) * 2
    log_library = torch.log(csr.dense(G).sum(1).clamp_min(1.0))
    log_library += 0.1 * torch.randn(B, generator=gen, dtype=torch.float64)
    px_r = torch.randn(*((B, G) if rows else (G,)), generator=gen, dtype=torch.float64) * 2
    px_r[..., : min(G, 2)] = torch.tensor([-9.0, 13.0], dtype=torch.float64)[: min(G, 2)]
    pi = torch.randn(B, G, generator=gen, dtype=torch.float64) * pi_scale + pi_shift
    floats = [t.to(device=device, dtype=dtype) for t in (logits, log_library, px_r, pi)]
    return floats, csr.to(device)


def _run(fn, floats, csr, w, *eps):
    leaves = [t.detach().clone().requires_grad_(True) for t in floats]
    ll = fn(*leaves, csr, *eps)
    return [ll.detach(), *torch.autograd.grad((ll * w).sum(), leaves)]


def _check_zinb(got, floats, csr, w, names=ZINB_NAMES, what=""):
    floats64 = [t.double() for t in floats]
    csr64 = csr.to(dtype=torch.float64)
    truth = _run(reference.zinb_softmax_loglik, floats64, csr64, w.double())
    scales = zinb_term_magnitudes(*floats64, csr64, w)
    for g, t, s, n in zip(got, truth, scales, names):
        assert_accurate(ZINB, g, t, f"{what} {n}", scale=s)


@pytest.mark.parametrize("rows", [False, True], ids=["px_r_G", "px_r_BG"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zinb_matches_reference(tk, device, poison_empty, case, dtype, rows):
    gen = torch.Generator().manual_seed(seed_of("zinb", case[:2], dtype, rows))
    floats, csr = _inputs(gen, case, dtype, device, rows)
    w = torch.randn(case[0], generator=gen, dtype=torch.float64).to(device, dtype)
    got = _run(tk.zinb_softmax_loglik, floats, csr, w)
    for g, t in zip(got[1:], floats):
        assert g.dtype == t.dtype
    _check_zinb(got, floats, csr, w)


@pytest.mark.parametrize("shift", [-100.0, -40.0, 40.0, 100.0])
def test_zinb_extreme_dropout_logits(tk, device, poison_empty, shift):
    """Dropout logits far in either tail: softplus and its slope stay finite and follow
    torch's softplus (linear above 20), with theta up to 4e5."""
    gen = torch.Generator().manual_seed(seed_of("extreme", shift))
    for dtype, rows in ((torch.float64, False), (torch.float32, True)):
        floats, csr = _inputs(gen, CASES[1], dtype, device, rows, pi_scale=20.0, pi_shift=shift)
        w = torch.randn(CASES[1][0], generator=gen, dtype=torch.float64).to(device, dtype)
        _check_zinb(_run(tk.zinb_softmax_loglik, floats, csr, w), floats, csr, w,
                    what=f"{dtype} rows={rows}")


# every launch shape at G = 300: the dense passes in several steps, small tiles and
# non-zero blocks
FORCED = [
    ("zinb_fwd", dict(BLOCK_G=64, BLOCK_NZ=16, num_warps=4)),
    ("zinb_bwd_dense", dict(BLOCK_B=2, BLOCK_G=64, num_warps=4)),
    ("zinb_bwd_sparse", dict(BLOCK_NZ=16, num_warps=4)),
]


@pytest.mark.parametrize("rows", [False, True], ids=["px_r_G", "px_r_BG"])
@pytest.mark.parametrize("kernel, config", FORCED, ids=lambda v: str(v))
def test_zinb_every_launch_shape(tk, device, poison_empty, kernel, config, rows):
    from scvi_fast.kernels.triton._configs import forced

    gen = torch.Generator().manual_seed(seed_of(kernel, sorted(config.items()), rows))
    floats, csr = _inputs(gen, CASES[0], torch.float32, device, rows)
    w = torch.randn(CASES[0][0], generator=gen).to(device)
    with forced(kernel, config):
        got = _run(tk.zinb_softmax_loglik, floats, csr, w)
    _check_zinb(got, floats, csr, w, what=f"{kernel} {config}:")


def test_zinb_bf16_logits_partial_grads_and_dispatch(tk, device):
    """bfloat16 logits read as they are (float32 result, bf16 gradient); a gradient to the
    dropout logits only; a torch CSR tensor through functional with impl="triton"."""
    gen = torch.Generator().manual_seed(5)
    floats, csr = _inputs(gen, CASES[0], torch.float32, device, rows=False)
    floats[0] = floats[0].to(torch.bfloat16)
    w = torch.randn(CASES[0][0], generator=gen).to(device)
    got = _run(tk.zinb_softmax_loglik, floats, csr, w)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    _check_zinb(got, floats, csr, w, what="bf16 logits:")
    logits, lib, px_r, pi = (t.detach() for t in floats)
    pi = pi.clone().requires_grad_(True)
    B, G = logits.shape
    indptr, indices, values = csr
    n = int(indptr[-1])
    X = torch.sparse_csr_tensor(indptr, indices[:n], values[:n], size=(B, G),
                                check_invariants=True)
    ll = functional.zinb_softmax_loglik(logits, lib[:, None], px_r, pi, X, impl="triton")
    (dpi,) = torch.autograd.grad((ll * w).sum(), pi)
    want = _run(reference.zinb_softmax_loglik, [t.double() for t in (logits, lib, px_r, pi)],
                csr.to(dtype=torch.float64), w.double())
    scales = zinb_term_magnitudes(logits, lib, px_r, pi, csr, w)
    assert_accurate(ZINB, ll, want[0], "loglik via functional", scale=scales[0])
    assert_accurate(ZINB, dpi, want[4], "ddropout only", scale=scales[4])


def test_zinb_bad_input(tk, device):
    logits = torch.zeros(2, 3, device=device)
    csr = (torch.tensor([0, 0, 0], device=device), torch.zeros(0, dtype=torch.long, device=device),
           torch.zeros(0, device=device))
    z = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match="px_r"):
        tk.zinb_softmax_loglik(logits, torch.zeros(2, device=device), torch.zeros(4, device=device),
                               z, csr)
    with pytest.raises(ValueError, match="dropout_logits"):
        tk.zinb_softmax_loglik(logits, torch.zeros(2, device=device), torch.zeros(3, device=device),
                               z[:1], csr)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nb_per_cell_dispersion(tk, device, poison_empty, dtype):
    """The NB op with a (B, G) px_r runs the ZINB kernels without zero inflation."""
    gen = torch.Generator().manual_seed(seed_of("nb_rows", dtype))
    floats, csr = _inputs(gen, CASES[0], dtype, device, rows=True)
    floats = floats[:3]
    w = torch.randn(CASES[0][0], generator=gen, dtype=torch.float64).to(device, dtype)
    got = _run(tk.nb_softmax_loglik, floats, csr, w)
    floats64 = [t.double() for t in floats]
    csr64 = csr.to(dtype=torch.float64)
    truth = _run(reference.nb_softmax_loglik, floats64, csr64, w.double())
    scales = nb_term_magnitudes(*floats64, csr64, w)
    for g, t, s, n in zip(got, truth, scales, ("loglik", "dlogits", "dlib", "dpx_r")):
        assert_accurate("nb_softmax_loglik", g, t, n, scale=s)


# ---- Poisson


def _check_poisson(got, floats, csr, w, what=""):
    floats64 = [t.double() for t in floats]
    csr64 = csr.to(dtype=torch.float64)
    truth = _run(reference.poisson_softmax_loglik, floats64, csr64, w.double())
    scales = poisson_term_magnitudes(*floats64, csr64, w)
    for g, t, s, n in zip(got, truth, scales, ("loglik", "dlogits", "dlog_library")):
        assert_accurate(POISSON, g, t, f"{what} {n}", scale=s)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_poisson_matches_reference(tk, device, poison_empty, case, dtype):
    gen = torch.Generator().manual_seed(seed_of("poisson", case[:2], dtype))
    floats, csr = _inputs(gen, case, dtype, device, rows=False)
    w = torch.randn(case[0], generator=gen, dtype=torch.float64).to(device, dtype)
    _check_poisson(_run(tk.poisson_softmax_loglik, floats[:2], csr, w), floats[:2], csr, w)


def test_poisson_streamed_lse_and_bf16(tk, device, poison_empty):
    """The log-sum-exp over several steps of genes, and bfloat16 logits read as they are."""
    from scvi_fast.kernels.triton._configs import forced

    gen = torch.Generator().manual_seed(9)
    floats, csr = _inputs(gen, CASES[0], torch.float32, device, rows=False)
    w = torch.randn(CASES[0][0], generator=gen).to(device)
    with forced("poisson_fwd", dict(BLOCK_G=64, BLOCK_NZ=16, num_warps=4)):
        got = _run(tk.poisson_softmax_loglik, floats[:2], csr, w)
    _check_poisson(got, floats[:2], csr, w, "BLOCK_G=64:")
    floats[0] = floats[0].to(torch.bfloat16)
    got = _run(tk.poisson_softmax_loglik, floats[:2], csr, w)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    _check_poisson(got, floats[:2], csr, w, "bf16 logits:")


def test_empty_batch_and_no_genes(tk, device):
    csr0 = (torch.zeros(1, dtype=torch.long, device=device),
            torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device))
    for B, G in ((0, 5), (2, 0)):
        csr = (torch.zeros(B + 1, dtype=torch.long, device=device), *csr0[1:])
        leaves = [torch.randn(B, G, device=device), torch.zeros(B, device=device),
                  torch.randn(G, device=device), torch.randn(B, G, device=device)]
        leaves = [t.requires_grad_() for t in leaves]
        for fn, lv in ((tk.zinb_softmax_loglik, leaves), (tk.poisson_softmax_loglik, leaves[:2])):
            ll = fn(*lv, csr)
            assert ll.shape == (B,) and (ll == 0).all()
            grads = torch.autograd.grad(ll.sum(), lv)
            assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, lv))
