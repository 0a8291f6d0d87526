"""How close a back-end must come to the reference: one tolerance table and its measures.

Every check of a fast back-end against :mod:`scvi_fast.reference` reads this table: the kernel
tests (``tests/kernels``, ``tests/kernels_triton``), the model tests (``tests/model``) and the
GPU check (``benchmarks/gpu_check_kernels.py``). An entry is keyed by ``(op, precision)``; the
precision is that of the output judged (``"float64"``, ``"float32"``, ``"bfloat16"``, see
:func:`precision_of`) or a GEMM mode (``"tf32"``, ``"autocast-bf16"``). Its type says how the
error is measured, ``t`` being the reference in float64 on the same inputs:

* :class:`Rel`: norm-wise, ``max|a - t| <= rtol * max|t|`` (float64 results).
* :class:`VsTorch`: judged against torch's own error at that precision on the same inputs
  (DESIGN habit 5): ``max|a - t| <= factor * max|r - t| + floor * max|t|``, ``r`` being the
  reference run at the low precision. The floor covers outputs that torch happens to get
  (nearly) exact, where any reordering of a sum costs a few ulps.
* :class:`Terms`: elementwise against the condition of the sum each output is:
  ``|a - t| <= k * s + rel * |t|``, ``s`` the sum of the absolute values of the terms that
  the output adds up (:func:`nb_term_magnitudes`). A sum computed with unit roundoff ``u`` is
  off by at most about ``n u s``, whatever cancels; for sums that cancel heavily (NB) neither
  norm above says how much error is unavoidable.
* :class:`Pointwise`: elementwise, ``|a - t| <= rtol * max(1, |t|)`` (special functions).

Where the largest ``|t|`` is 0 the norm-wise measures become absolute (``max|t|`` taken as
1). A caller may pass its own ``scale`` for ``max|t|`` (the model tests floor it: a bias right
before a BatchNorm has an exact gradient of 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scvi_fast.reference._csr import csr_parts, csr_to_dense

F32_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Rel:
    """``max|a - t| <= rtol * max|t|``."""

    rtol: float


@dataclass(frozen=True)
class VsTorch:
    """``max|a - t| <= factor * max|r - t| + floor * max|t|`` (``r``: torch at that precision)."""

    factor: float
    floor: float


@dataclass(frozen=True)
class Terms:
    """``|a - t| <= k * s + rel * |t|`` elementwise (``s``: sum of |terms| of each output)."""

    k: float
    rel: float = 0.0


@dataclass(frozen=True)
class Pointwise:
    """``|a - t| <= rtol * max(1, |t|)`` elementwise."""

    rtol: float


TOL: dict[tuple[str, str], Rel | VsTorch | Terms | Pointwise] = {
    # ---- sparse_linear
    # float64: the same products summed in another order (register tiles, per-gene sums over a
    # transposed batch, CSC segments instead of torch's CSR matmul): a few ulps of 1.1e-16 times
    # the number of terms per output (<= G = 8000) in the worst case.
    ("sparse_linear", "float64"): Rel(1e-12),
    # float32: float accumulations in another order than torch's sparse matmul (and log1p by
    # Goldberg's identity where libdevice is missing): the same error model, so a factor of 4
    # only absorbs the luck of the draw.
    ("sparse_linear", "float32"): VsTorch(4.0, 8 * F32_EPS),
    # The dense method's GEMM in TF32 or under bf16 autocast (GPU), against torch's own GEMM on
    # the dense input at that precision (what an nn.Linear first layer runs): the same GEMM
    # after the same rounding of the inputs, so the same factor.
    ("sparse_linear", "tf32"): VsTorch(4.0, 8 * F32_EPS),
    ("sparse_linear", "autocast-bf16"): VsTorch(4.0, 8 * F32_EPS),
    # ---- nb_softmax_loglik
    # Its sums cancel terms of very different size (lgamma differences at counts up to 2^24,
    # theta (log theta - log(theta + mu)) at theta ~ 4e5), so the error is bounded elementwise
    # by k * (sum of the absolute values of the terms), the classical forward error bound of a
    # sum (kappa * u). The reference itself is only that accurate: the native kernel's exact
    # rewrites (log of a ratio, lgamma(x+t) - lgamma(t) as the log of a product for small
    # counts) remove cancellations the reference has, whose rounding (lgamma ~4e4 at counts of
    # 5000: ~1e-11) shows in the comparison and is within these bounds.
    # float64: u = 1.1e-16 and the plain-Triton lgamma / digamma are ~1e-14 relative:
    # k = 5e-13 (~4500 u); measured <= 1e-13.
    ("nb_softmax_loglik", "float64"): Terms(5e-13),
    # float32: u = 6e-8, measured <= 5e-7 for the kernels and for torch's own float32:
    # k = 2e-6 (~30 u). The native kernel evaluates lgamma / digamma and the per-cell sums in
    # double and the dense pass with < 2 ulp exp / log polynomials; Triton sums in float32.
    ("nb_softmax_loglik", "float32"): Terms(2e-6),
    # bfloat16 logits (Triton reads them as they are): their gradient, in bfloat16, is one
    # rounding of a float32-accurate value: 2^-8 relative when rounded to nearest (compiled),
    # 2^-7 when truncated (Triton's interpreter casts so). The float32 outputs of the same
    # call take the float32 entry, against the reference on the same (rounded) logits.
    ("nb_softmax_loglik", "bfloat16"): Terms(2e-6, rel=2.0**-7),
    # The px_r gradient summed in another order (per-gene atomic adds on a GPU, in any order;
    # the deterministic per-entry path; a padded or replayed batch) against itself: float64
    # sums of B terms reordered; float32 likewise, norm-wise (a gene whose terms cancel has a
    # large relative error in any order, a small one against the largest gene's).
    ("nb_px_r_order", "float64"): Rel(1e-13),
    ("nb_px_r_order", "float32"): Rel(1e-6),
    # ---- zinb_softmax_loglik (and nb_softmax_loglik with a (B, G) px_r, the same kernel)
    # The NB sums plus the softplus pair of each zero count, judged like nb_softmax_loglik
    # against the sum of |terms| of each output (zinb_term_magnitudes), which adds the rounding
    # of nb0 = theta (log(theta+eps) - log(theta+mu+eps)) to the terms that depend on it through
    # sigmoid(nb0 - pi) (at theta ~ 4e5 that rounding is ~1e-10 in float64 and ~3e2 u in
    # float32 of a quantity of order 1).
    # float64: as nb_softmax_loglik (u = 1.1e-16, plain-Triton lgamma / digamma ~1e-14).
    ("zinb_softmax_loglik", "float64"): Terms(5e-13),
    # float32: the dense pass in float32 with < 2 ulp exp / log / log1p polynomials (native)
    # or libdevice / plain Triton, the non-zeros in double (native) or float32 (Triton):
    # the k of nb_softmax_loglik.
    ("zinb_softmax_loglik", "float32"): Terms(2e-6),
    # bfloat16 logits (Triton reads them as they are): the logits' gradient is one bfloat16
    # rounding of a float32-accurate value, as for nb_softmax_loglik.
    ("zinb_softmax_loglik", "bfloat16"): Terms(2e-6, rel=2.0**-7),
    # ---- poisson_softmax_loglik: sums of x log(rate) - lgamma(x+1) over the non-zeros and
    # X - exp(l) (which cancel when the library matches the counts), judged against the sum of
    # |terms| (poisson_term_magnitudes); the same k as the NB op, whose sums are of the same kind.
    ("poisson_softmax_loglik", "float64"): Terms(5e-13),
    ("poisson_softmax_loglik", "float32"): Terms(2e-6),
    ("poisson_softmax_loglik", "bfloat16"): Terms(2e-6, rel=2.0**-7),
    # ---- nb_softmax_loglik_linear (output layer + likelihood; compared value and gradients
    # to h, weight, bias, log library and px_r, so norm-wise)
    # float64: the NB kernel's error plus GEMMs over H (a few ulps times H) for the logits and
    # over B or G for the weight and input gradients; the reference's own cancellation (see
    # nb_softmax_loglik) reaches ~1e-11 of the per-cell sums: 1e-10 leaves a margin of 10.
    ("nb_softmax_loglik_linear", "float64"): Rel(1e-10),
    # float32: the NB kernel's factor; the GEMMs are torch's own (the same calls as the
    # reference), only the upstream scaling moves from the B x G gradient onto B x H tensors.
    ("nb_softmax_loglik_linear", "float32"): VsTorch(4.0, 8 * F32_EPS),
    # ---- reparam_kl
    # float64: elementwise formulas identical to the reference's up to operation order.
    ("reparam_kl", "float64"): Rel(1e-13),
    # float32: elementwise float math with < 2 ulp exp / log, like torch's own vectorised
    # ones, and the KL summed over Z in float as torch does.
    ("reparam_kl", "float32"): VsTorch(4.0, 8 * F32_EPS),
    # ---- the whole VAE (scvi-tools fixture models): loss and every parameter gradient
    # float64: the kernels' float64 bounds above (<= 1e-10), composed through the net, norm-wise
    # against max(max|t|, 1e-6 x the largest output), since the biases right before a BatchNorm
    # have an exact gradient of 0 (every back-end returns rounding noise of ~1e-17 there).
    ("model", "float64"): Rel(1e-9),
    # float32: within 4x torch's own float32 error, plus a few float32 ulps of that scale.
    ("model", "float32"): VsTorch(4.0, 1e-6),
    # ---- special functions of the Triton kernels, relative to max(1, |value|)
    # float64: the asymptotic series truncated below 1e-16 after the shift to x >= 12; what is
    # left is the rounding of the shift's log and of the sum (a few ulp of lgamma(12) ~ 17.5).
    ("lgamma", "float64"): Pointwise(5e-14),
    ("digamma", "float64"): Pointwise(5e-15),
    # float32, against the float64 value at the same float32 argument: lgamma's absolute error
    # ~3 ulp of ~22 after the shift (cancellation near its roots 1, 2); digamma within 2x of
    # torch's own float32 digamma.
    ("lgamma", "float32"): Pointwise(1e-5),
    ("digamma", "float32"): Pointwise(2e-6),
}

_PRECISION = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


def precision_of(t: torch.Tensor) -> str:
    """The precision key of a result: its dtype's name (``"float64"``, ``"float32"``, ...)."""
    return _PRECISION[t.dtype]


def error_ratio(
    op: str,
    got: torch.Tensor,
    truth: torch.Tensor,
    *,
    precision: str | None = None,
    low: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
) -> float:
    """Error of ``got`` against ``truth`` (float64) over the error ``TOL[(op, precision)]``
    allows: at most 1 passes; ``inf`` for non-finite values or another shape.

    ``precision`` defaults to :func:`precision_of` ``(got)``. ``low``: torch's result at that
    precision (:class:`VsTorch` entries); ``scale``: the term magnitudes (:class:`Terms`), or
    ``max|t|`` to use instead of the truth's own (:class:`Rel`, :class:`VsTorch`).
    """
    key = (op, precision or precision_of(got))
    tol = TOL[key]
    if isinstance(tol, VsTorch) and low is None:
        raise ValueError(f"{key}: judged against torch's own error, so it needs low=")
    if isinstance(tol, Terms) and not isinstance(scale, torch.Tensor):
        raise ValueError(f"{key}: judged against the term magnitudes, so it needs scale=")
    if got.shape != truth.shape or not bool(torch.isfinite(got).all()):
        return float("inf")
    if low is not None and low.dtype != got.dtype:
        return float("inf")  # a result at another precision than torch's is a wrong result
    if truth.numel() == 0:
        return 0.0
    truth = truth.double()
    diff = (got.double() - truth).abs()
    if isinstance(tol, Terms):
        # an absolute floor of 2^10 smallest normal numbers of the result's dtype: the
        # float32 kernels' exp flushes to 0 below exp(-87.3) ~ tiny, and a ZINB gradient is
        # such an exp (sigmoid(nb0 - pi) at large pi) times factors up to ~1e3
        tiny = 1024 * torch.finfo(got.dtype).tiny if got.is_floating_point() else 1e-300
        allowed = tol.k * scale.double() + tol.rel * truth.abs() + tiny
        return (diff / allowed).max().item()
    if isinstance(tol, Pointwise):
        return (diff / (tol.rtol * truth.abs().clamp_min(1.0))).max().item()
    norm = truth.abs().max().item() if scale is None else float(scale)
    norm = norm if norm > 0 else 1.0
    if isinstance(tol, Rel):
        allowed = tol.rtol * norm
    else:
        torch_err = (low.double() - truth).abs().max().item()
        allowed = tol.factor * torch_err + tol.floor * norm
    err = diff.max().item()
    return err / allowed if allowed > 0 else (0.0 if err == 0 else float("inf"))


def assert_accurate(
    op: str,
    got: torch.Tensor,
    truth: torch.Tensor,
    what: str = "",
    *,
    precision: str | None = None,
    low: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
) -> None:
    """Raise AssertionError when ``got`` is further from ``truth`` than :data:`TOL` allows
    (see :func:`error_ratio` for the arguments)."""
    key = (op, precision or precision_of(got))
    ratio = error_ratio(op, got, truth, precision=key[1], low=low, scale=scale)
    if ratio <= 1.0:
        return
    same = got.shape == truth.shape
    err = f"{rel_err(got, truth):.3g} (norm-wise)" if same else f"shape {tuple(got.shape)}"
    detail = f"{got.dtype}" if low is None else f"{got.dtype}, torch's own {rel_err(low, truth):.3g}"
    raise AssertionError(
        f"{op} {what}: error {err} is {ratio:.3g} x what {TOL[key]} allows ({detail})"
    )


def rel_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    """Norm-wise relative error ``max|a - t| / max|t|`` (absolute where ``t`` is all zeros; 0
    for empty tensors)."""
    if truth.numel() == 0:
        return 0.0
    diff = (a.double() - truth.double()).abs().max().item()
    scale = truth.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def nb_term_magnitudes(logits, log_library, px_r, X_csr, w, eps=1e-8) -> list[torch.Tensor]:
    """Per output element of the NB op, the sum of the absolute values of the terms it adds
    up, in float64 (dense ``B x G``: small shapes or a GPU); the ``scale`` of a :class:`Terms`
    entry.

    Returns ``[loglik (B,), dlogits (B, G), dlog_library (B,), dpx_r (px_r's shape)]`` for upstream
    gradient ``w``, following the formulas of :mod:`scvi_fast.reference._nb` and the
    gradients in ``kernels/triton/_nb_loglik.py``'s docstring (lgamma and digamma terms only
    at the non-zeros, where the kernels evaluate them).
    """
    indptr, indices, values = csr_parts(X_csr)
    z, lib, r = (t.detach().double() for t in (logits, log_library, px_r))
    x = csr_to_dense(indptr, indices, values.double(), z.shape[1])
    rho = torch.softmax(z, -1)
    mu = torch.exp(lib.reshape(-1, 1)) * rho
    th = torch.exp(r if r.dim() == 2 else r.reshape(-1))  # (G,) or per-cell (B, G)
    d = th + mu + eps
    nz = x > 0
    lgam = torch.lgamma(x + th).abs() + torch.lgamma(th).abs() + torch.lgamma(x + 1).abs()
    ll = (
        (th * torch.log(th + eps)).abs() + (th * torch.log(d)).abs()
        + (x * torch.log(mu + eps)).abs() + (x * torch.log(d)).abs() + torch.where(nz, lgam, 0)
    ).sum(-1)
    c_abs = x * mu / (mu + eps) + (th + x) * mu / d
    c_sum = c_abs.sum(-1, keepdim=True)
    w = w.detach().double().abs().reshape(-1)
    digam = torch.where(nz, torch.digamma(x + th).abs() + torch.digamma(th).abs(), 0)
    t_abs = (
        torch.log(th + eps).abs() + torch.log(d).abs() + th / (th + eps) + (th + x) / d + x / d
        + digam
    )
    return [
        ll,
        w[:, None] * (c_abs + rho * c_sum),
        w * c_sum[:, 0],
        th * w[:, None] * t_abs if r.dim() == 2 else th * (w[:, None] * t_abs).sum(0),
    ]


def zinb_term_magnitudes(logits, log_library, px_r, dropout_logits, X_csr, w, eps=1e-8):
    """Per output element of the ZINB op, the sum of the absolute values of the terms it adds
    up, in float64 (dense ``B x G``: small shapes or a GPU); the ``scale`` of a :class:`Terms`
    entry.

    Returns ``[loglik (B,), dlogits (B, G), dlog_library (B,), dpx_r (px_r's shape),
    ddropout (B, G)]`` for upstream gradient ``w``, following the formulas of
    ``csrc/likelihood_impl.h``. The zero-count parts go through ``s_z = sigmoid(nb0 - pi)``,
    ``nb0 = theta (log(theta+eps) - log(theta+mu+eps))``, whose own rounding (``u`` times
    ``|theta log(theta+eps)| + |theta log(theta+mu+eps)|``, large for large theta) reaches
    them with the factor ``s_z (1 - s_z)``: it is added to their magnitudes.
    """
    indptr, indices, values = csr_parts(X_csr)
    z, lib, r, pi = (t.detach().double() for t in (logits, log_library, px_r, dropout_logits))
    x = csr_to_dense(indptr, indices, values.double(), z.shape[1])
    rho = torch.softmax(z, -1)
    mu = torch.exp(lib.reshape(-1, 1)) * rho
    th = torch.exp(r).expand_as(z)
    d = th + mu + eps
    lte, ld = torch.log(th + eps), torch.log(d)
    nb0 = th * (lte - ld)
    nb0_abs = (th * lte).abs() + (th * ld).abs()
    s_z = torch.sigmoid(nb0 - pi)
    amp = s_z * (1 - s_z) * nb0_abs  # relative error that nb0's rounding gives s_z-weighted terms
    sp = torch.nn.functional.softplus
    nz = x > 0
    lgam = torch.lgamma(x + th).abs() + torch.lgamma(th).abs() + torch.lgamma(x + 1).abs()
    # the reference's -softplus(-pi) - pi, and its gradient sigmoid(-pi) - 1
    ll_nz = (sp(-pi) + pi.abs() + nb0_abs + (x * torch.log(mu + eps)).abs() + (x * ld).abs() + lgam)
    ll_z = sp(nb0 - pi) + sp(-pi) + s_z * nb0_abs
    ll = torch.where(nz, ll_nz, ll_z).sum(-1)
    c_nz = x * mu / (mu + eps) + (th + x) * mu / d
    c_z = (s_z + amp) * th * mu / d
    c_abs = torch.where(nz, c_nz, c_z)
    c_sum = c_abs.sum(-1, keepdim=True)
    wc = w.detach().double().abs().reshape(-1, 1)
    digam = torch.where(nz, torch.digamma(x + th).abs() + torch.digamma(th).abs(), 0)
    t_abs = th * (lte.abs() + ld.abs() + th / (th + eps) + (th + x) / d + x / d + digam)
    t_abs = torch.where(nz, t_abs, (s_z + amp) * t_abs)
    dr = wc * t_abs
    dpi = torch.where(nz, 1 + torch.sigmoid(-pi), torch.sigmoid(-pi) + s_z + amp)
    return [
        ll,
        wc * (c_abs + rho * c_sum),
        wc[:, 0] * c_sum[:, 0],
        dr if px_r.dim() == 2 else dr.sum(0),
        wc * dpi,
    ]


def poisson_term_magnitudes(logits, log_library, X_csr, w) -> list[torch.Tensor]:
    """Per output element of the Poisson op, the sum of the absolute values of its terms, in
    float64: ``[loglik (B,), dlogits (B, G), dlog_library (B,)]`` for upstream gradient
    ``w`` (``log(rate) = l + z - lse`` and ``sum_g rate_g = exp(l)``, see
    ``kernels/native/poisson_softmax_loglik.py``)."""
    indptr, indices, values = csr_parts(X_csr)
    z, lib = (t.detach().double() for t in (logits, log_library))
    x = csr_to_dense(indptr, indices, values.double(), z.shape[1])
    lse = torch.logsumexp(z, -1, keepdim=True)
    l = lib.reshape(-1, 1)
    log_rate_abs = l.abs() + z.abs() + lse.abs()
    X = x.sum(-1, keepdim=True)
    ll = (x * log_rate_abs + torch.lgamma(x + 1)).sum(-1) + torch.exp(l[:, 0])
    wc = w.detach().double().abs().reshape(-1, 1)
    # the reference's gradient to the logits adds mu dL/dmu = x - mu over genes (the rate's
    # own cancellation, even where the exact result is 0, as in a cell without counts)
    rho = torch.softmax(z, -1)
    c_sum = X + torch.exp(l)
    return [ll, wc * (x + torch.exp(l) * rho + rho * c_sum), wc[:, 0] * c_sum[:, 0]]
