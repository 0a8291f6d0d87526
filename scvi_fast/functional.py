"""The stable op API: every fused op with an explicit ``impl=`` dispatch.

``impl="auto"`` picks the fastest available back-end for the tensors' device
(Triton on CUDA, the compiled native extension on CPU) and falls back to the
pure-PyTorch reference; ``"triton"``, ``"native"`` and ``"torch"`` force one
(and raise a clear error when it is unavailable).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

import torch

from scvi_fast import reference

Impl = Literal["auto", "triton", "native", "torch"]
IMPLS = ("auto", "triton", "native", "torch")
Method = Literal["auto", "gather", "dense"]


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def backend(name: Literal["native", "triton"]) -> ModuleType:
    """The kernel package of a back-end, raising ImportError with a fix if unavailable.

    Each back-end package (``scvi_fast.kernels.native``, ``scvi_fast.kernels.triton``)
    exposes ``is_available()``, ``unavailable_reason()`` and the three ops with the
    reference signatures.
    """
    mod = importlib.import_module(f"scvi_fast.kernels.{name}")
    if not mod.is_available():
        raise ImportError(f"impl={name!r} is unavailable: {mod.unavailable_reason()}")
    return mod


def _is_available(name: str) -> bool:
    try:
        return importlib.import_module(f"scvi_fast.kernels.{name}").is_available()
    except ImportError:
        return False


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The concrete back-end that ``impl`` means for tensors on ``device``.

    ``"auto"`` is Triton on CUDA and the native extension on CPU when they are
    available, else the PyTorch reference.
    """
    _check_impl(impl)
    if impl != "auto":
        return impl
    device = torch.device(device)
    if device.type == "cuda" and _is_available("triton"):
        return "triton"
    if device.type == "cpu" and _is_available("native"):
        return "native"
    return "torch"


def sparse_linear(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    cov: torch.Tensor | None = None,
    W_cov: torch.Tensor | None = None,
    transform: Literal["log1p", "identity"] = "log1p",
    impl: Impl = "auto",
    method: Method = "auto",
) -> torch.Tensor:
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR minibatch ``X`` of shape ``(B, G)``.

    Parameters
    ----------
    indptr, indices, values
        The CSR minibatch (row pointer of length ``B + 1``, gene ids, counts). ``indptr`` and
        ``indices`` may be int32 or int64; ``indices`` / ``values`` may be longer than
        ``indptr[-1]`` (a padded capacity: the tail is ignored, whatever it holds).
    W
        ``(G, H)`` weight, gene-major (the transpose of ``nn.Linear.weight``).
    b
        ``(H,)`` bias or None.
    cov, W_cov
        Optional ``(B,)`` category codes and ``(K, H)`` weights; adds ``W_cov[cov]``.
    transform
        Applied to the stored values on the fly: ``"log1p"`` (scVI's encoder) or ``"identity"``.
    impl
        Back-end, see module docstring.
    method
        ``"gather"``: sum ``f(v) W[g]`` over the stored entries (``2 nnz H`` work);
        ``"dense"``: scatter ``f(values)`` into a dense ``(B, G)`` matrix on the tensors'
        device (never on the host) and run the GEMM (cuBLAS on CUDA: TF32 when
        ``torch.backends.cuda.matmul.allow_tf32`` is set, the autocast dtype under autocast);
        ``"auto"``: dense for CUDA tensors, gather elsewhere. Every back-end accepts it.

    Returns
    -------
    ``(B, H)`` tensor (in the autocast dtype for ``"dense"`` under autocast). Gradients flow
    to ``W``, ``b`` and ``W_cov`` only.
    """
    which = resolve_impl(impl, W.device)
    if which == "torch":
        return reference.sparse_linear(
            indptr, indices, values, W, b, cov, W_cov, transform, method=method
        )
    return backend(which).sparse_linear(
        indptr, indices, values, W, b, cov, W_cov, transform, method=method
    )


def nb_softmax_loglik(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    px_r: torch.Tensor,
    X_csr,
    eps: float = 1e-8,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-cell NB log-likelihood of CSR counts under ``mu = exp(l) softmax(logits)``.

    See :func:`scvi_fast.reference.nb_softmax_loglik`; gradients flow to ``logits``,
    ``log_library`` and ``px_r``. The likelihood is always evaluated in float32 or better:
    the Triton back-end reads bfloat16 / float16 logits as they are (the logits' gradient
    comes back in their dtype), the other back-ends evaluate them in float32.
    """
    which = resolve_impl(impl, logits.device)
    if which != "triton" and logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if which == "torch":
        return reference.nb_softmax_loglik(logits, log_library, px_r, X_csr, eps)
    return backend(which).nb_softmax_loglik(logits, log_library, px_r, X_csr, eps)


def nb_softmax_loglik_linear(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    log_library: torch.Tensor,
    px_r: torch.Tensor,
    X_csr,
    eps: float = 1e-8,
    impl: Impl = "auto",
) -> torch.Tensor:
    """:func:`nb_softmax_loglik` of the output layer ``logits = h @ weight.T + bias``.

    The native back-end fuses the layer with the likelihood (the ``B x G`` logits and their
    gradient stay in reused buffers and the backward never forms the scaled logit gradient,
    see :mod:`scvi_fast.kernels.native.nb_linear_loglik`); the other back-ends compose
    ``F.linear`` and :func:`nb_softmax_loglik`. Under autocast, or for mixed dtypes, the
    composition is used; with the Triton back-end the logits stay in the autocast dtype.
    """
    which = resolve_impl(impl, h.device)
    if (
        which == "native"
        and not torch.is_autocast_enabled(h.device.type)
        and h.dtype == weight.dtype
    ):
        return backend("native").nb_softmax_loglik_linear(
            h, weight, bias, log_library, px_r, X_csr, eps
        )
    if which == "triton":
        logits = torch.nn.functional.linear(h, weight, bias)
    else:
        logits = reference.output_logits(h, weight, bias)
    return nb_softmax_loglik(logits, log_library, px_r, X_csr, eps, impl=which)


def reparam_kl(
    q_m: torch.Tensor,
    q_v_raw: torch.Tensor,
    eps_noise: torch.Tensor,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = q_m + sqrt(exp(q_v_raw) + 1e-4) * eps_noise`` and the per-cell KL to N(0, I)."""
    which = resolve_impl(impl, q_m.device)
    if which == "torch":
        return reference.reparam_kl(q_m, q_v_raw, eps_noise)
    return backend(which).reparam_kl(q_m, q_v_raw, eps_noise)


def dropout(x: torch.Tensor, p: float, training: bool = True, impl: Impl = "auto") -> torch.Tensor:
    """Dropout: ``F.dropout`` for ``torch`` / ``triton``; on the CPU, ``native`` draws the
    mask with a counter-based hash instead of ``bernoulli_`` (same distribution, another
    random stream, about 30x faster there; see :mod:`scvi_fast.kernels.native.dropout`)."""
    which = resolve_impl(impl, x.device)
    if which == "native" and not torch.is_autocast_enabled(x.device.type):
        return backend("native").dropout(x, p, training)
    return torch.nn.functional.dropout(x, p, training)
