"""The stable op API: every fused op with an explicit ``impl=`` dispatch.

``impl="auto"`` picks the fastest available back-end for the tensors' device
(Triton on CUDA, the compiled native extension on CPU) and falls back to the
pure-PyTorch reference; ``"triton"``, ``"native"`` and ``"torch"`` force one
(and raise a clear error when it is unavailable).

The back-end contract
---------------------
A back-end is a module: ``scvi_fast.reference`` (``"torch"``), ``scvi_fast.kernels.native``
and ``scvi_fast.kernels.triton``. Each exposes ``is_available()``, ``unavailable_reason()``
and every op in :data:`OPS`, with the signature of the function of that name below without
its ``impl`` argument (same parameter names, order, kinds and defaults;
:func:`op_signature`). Where a back-end has no fused kernel for an op, its module composes
the op explicitly from others (each op's docstring below says which), so the functions here
only resolve ``impl`` and call ``backend(which).<op>(...)``: nothing in this module depends
on which back-end runs. A new op, or a new back-end, is added to every back-end module; the
contract test (``tests/kernels/test_backend_contract.py``) fails until it is.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Literal

import torch

from scvi_fast.reference import VAR_EPS

Impl = Literal["auto", "triton", "native", "torch"]
IMPLS = ("auto", "triton", "native", "torch")
Method = Literal["auto", "gather", "dense"]

#: the module of each concrete back-end
BACKENDS = {
    "torch": "scvi_fast.reference",
    "native": "scvi_fast.kernels.native",
    "triton": "scvi_fast.kernels.triton",
}
#: the ops every back-end exposes (see the module docstring)
OPS = ("sparse_linear", "nb_softmax_loglik", "nb_softmax_loglik_linear", "zinb_softmax_loglik",
       "poisson_softmax_loglik", "reparam_kl", "dropout")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def op_signature(name: str) -> inspect.Signature:
    """The signature op ``name`` has in every back-end: this module's, without ``impl``."""
    if name not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {name!r}")
    sig = inspect.signature(globals()[name])
    return sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "impl"])


def backend(name: Literal["torch", "native", "triton"]) -> ModuleType:
    """The module of back-end ``name``, raising ImportError with a fix if it is unavailable."""
    mod = importlib.import_module(BACKENDS[name])
    if not mod.is_available():
        raise ImportError(f"impl={name!r} is unavailable: {mod.unavailable_reason()}")
    return mod


def _is_available(name: str) -> bool:
    try:
        return importlib.import_module(BACKENDS[name]).is_available()
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
        Optional category codes and ``(K, H)`` weights: ``(B,)`` codes add ``W_cov[cov]``;
        ``(B, C)`` codes (C categorical covariates offset into one stacked table) add
        ``sum_c W_cov[cov[:, c]]``. The fast back-ends gather the first column inside their
        kernel and the others with :func:`scvi_fast.reference.covariate_rows`.
    transform
        Applied to the stored values on the fly: ``"log1p"`` (scVI's encoder) or ``"identity"``.
    impl
        Back-end, see module docstring.
    method
        ``"gather"``: sum ``f(v) W[g]`` over the stored entries (``2 nnz H`` work);
        ``"dense"``: scatter ``f(values)`` into a dense ``(B, G)`` matrix on the tensors'
        device (never on the host) and run the GEMM (cuBLAS on CUDA: TF32 when
        ``torch.backends.cuda.matmul.allow_tf32`` is set, the autocast dtype under autocast);
        ``"auto"``: dense for CUDA tensors, gather elsewhere. Every back-end accepts it: the
        reference multiplies a torch sparse matrix (gather) or densifies with ``index_put_``;
        native gathers with its C++ kernels and densifies as the reference does; Triton has a
        kernel for each (a segment gather; a densify kernel followed by torch's GEMM).

    Returns
    -------
    ``(B, H)`` tensor (in the autocast dtype for ``"dense"`` under autocast). Gradients flow
    to ``W``, ``b`` and ``W_cov`` only.
    """
    return backend(resolve_impl(impl, W.device)).sparse_linear(
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
    ``log_library`` and ``px_r``. Fused in every back-end. The likelihood is always evaluated
    in float32 or better: the Triton back-end reads bfloat16 / float16 logits as they are (the
    logits' gradient comes back in their dtype), the other back-ends evaluate them in float32.
    """
    return backend(resolve_impl(impl, logits.device)).nb_softmax_loglik(
        logits, log_library, px_r, X_csr, eps
    )


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
    see :mod:`scvi_fast.kernels.native.nb_linear_loglik`), except under autocast or for mixed
    dtypes. The reference, Triton, and native in those cases compose ``F.linear`` with their
    own :func:`nb_softmax_loglik` (:func:`scvi_fast.reference.linear_then_nb`); with Triton
    the logits stay in the autocast dtype.
    """
    return backend(resolve_impl(impl, h.device)).nb_softmax_loglik_linear(
        h, weight, bias, log_library, px_r, X_csr, eps
    )


def zinb_softmax_loglik(
    logits: torch.Tensor,
    log_library: torch.Tensor,
    px_r: torch.Tensor,
    dropout_logits: torch.Tensor,
    X_csr,
    eps: float = 1e-8,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-cell zero-inflated NB log-likelihood of CSR counts under ``mu = exp(l) softmax(logits)``.

    See :func:`scvi_fast.reference.zinb_softmax_loglik`: ``px_r`` is ``(G,)`` or ``(B, G)``
    (per-cell, per-batch or per-label dispersions gathered for the minibatch),
    ``dropout_logits`` ``(B, G)``; gradients flow to ``logits``, ``log_library``, ``px_r`` and
    ``dropout_logits``.
    """
    return backend(resolve_impl(impl, logits.device)).zinb_softmax_loglik(
        logits, log_library, px_r, dropout_logits, X_csr, eps
    )


def poisson_softmax_loglik(
    logits: torch.Tensor, log_library: torch.Tensor, X_csr, impl: Impl = "auto"
) -> torch.Tensor:
    """Per-cell Poisson log-likelihood of CSR counts under ``rate = exp(l) softmax(logits)``.

    See :func:`scvi_fast.reference.poisson_softmax_loglik`; gradients flow to ``logits`` and
    ``log_library``.
    """
    return backend(resolve_impl(impl, logits.device)).poisson_softmax_loglik(
        logits, log_library, X_csr
    )


def reparam_kl(
    q_m: torch.Tensor,
    q_v_raw: torch.Tensor,
    eps_noise: torch.Tensor,
    var_eps: float = VAR_EPS,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = q_m + sqrt(exp(q_v_raw) + var_eps) * eps_noise`` and the per-cell KL to N(0, I).

    See :func:`scvi_fast.reference.reparam_kl`; fused in every back-end.
    """
    return backend(resolve_impl(impl, q_m.device)).reparam_kl(q_m, q_v_raw, eps_noise, var_eps)


def dropout(x: torch.Tensor, p: float, training: bool = True, impl: Impl = "auto") -> torch.Tensor:
    """Dropout: ``F.dropout`` for ``torch`` / ``triton``; on the CPU, ``native`` draws the
    mask with a counter-based hash instead of ``bernoulli_`` (same distribution, another
    random stream, about 30x faster there; ``F.dropout`` under autocast and for dtypes other
    than float32 / float64; see :mod:`scvi_fast.kernels.native.dropout`)."""
    return backend(resolve_impl(impl, x.device)).dropout(x, p, training)
