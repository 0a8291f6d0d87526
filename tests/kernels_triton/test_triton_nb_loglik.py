"""Fused softmax + NB log-likelihood (Triton) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from _triton_helpers import assert_within_scale, random_csr, seed_of
from scvi_fast import functional, reference

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
        gen, B, G, density, dtype, index_dtype, max_count, empty_rows, unobserved
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
    return floats, (indptr.to(device), indices.to(device), values.to(device))


def _condition_scales(tk, floats, csr, w, eps=1e-8):
    """Per output element, the sum of |terms| it adds up (see ``term_magnitudes``)."""
    return tk._kernels("_nb_loglik").term_magnitudes(*floats, csr, w, eps)


def _run(fn, floats, csr, w, eps=1e-8):
    leaves = [t.detach().clone().requires_grad_(True) for t in floats]
    ll = fn(leaves[0], leaves[1], leaves[2], csr, eps)
    grads = torch.autograd.grad((ll * w).sum(), leaves)
    return [ll.detach()] + list(grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(tk, device, poison_empty, case, dtype):
    gen = torch.Generator().manual_seed(seed_of(case[:2], dtype))
    floats, csr = _inputs(gen, case, dtype, device)
    w = torch.randn(case[0], generator=gen, dtype=torch.float64).to(device, dtype)
    got = _run(tk.nb_softmax_loglik, floats, csr, w)
    floats64 = [t.double() for t in floats]
    csr64 = (csr[0], csr[1], csr[2].double())
    truth = _run(reference.nb_softmax_loglik, floats64, csr64, w.double())
    scales = _condition_scales(tk, floats64, csr64, w)
    for g, t, s, n in zip(got, truth, scales, ["loglik", "dlogits", "dlog_library", "dpx_r"]):
        assert_within_scale(g, t, s, "nb", dtype, n)


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
    scales = _condition_scales(tk, floats, (indptr, indices, values), w)
    assert_within_scale(ll, ll_ref, scales[0], "nb", torch.float64, "loglik")
    (g,) = torch.autograd.grad((ll * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ll_ref * w).sum(), logits)
    assert_within_scale(g, g_ref, scales[1], "nb", torch.float64, "dlogits")


def test_other_eps(tk, device):
    gen = torch.Generator().manual_seed(11)
    floats, csr = _inputs(gen, CASES[1], torch.float64, device)
    w = torch.randn(CASES[1][0], generator=gen, dtype=torch.float64).to(device)
    scales = _condition_scales(tk, floats, csr, w, eps=1e-3)
    for g, r, s in zip(
        _run(tk.nb_softmax_loglik, floats, csr, w, eps=1e-3),
        _run(reference.nb_softmax_loglik, floats, csr, w, eps=1e-3),
        scales,
    ):
        assert_within_scale(g, r, s, "nb", torch.float64, "eps=1e-3")


def test_bad_input(tk, device):
    logits = torch.zeros(2, 3, device=device)
    csr = (torch.tensor([0, 0, 0], device=device), torch.zeros(0, dtype=torch.long, device=device),
           torch.zeros(0, device=device))
    zeros = lambda n: torch.zeros(n, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="px_r"):
        tk.nb_softmax_loglik(logits, zeros(2), zeros(4), csr)
    with pytest.raises(ValueError, match="log_library"):
        tk.nb_softmax_loglik(logits, zeros(3), zeros(3), csr)
