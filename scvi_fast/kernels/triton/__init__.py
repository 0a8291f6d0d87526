"""Triton (GPU) back-end of the fused ops.

Exposes ``is_available()``, ``unavailable_reason()`` and every op of the back-end contract
(``scvi_fast.functional.OPS``, with the signatures given there)::

    sparse_linear(indptr, indices, values, W, b, cov, W_cov, transform, method)
    nb_softmax_loglik(logits, log_library, px_r, X_csr, eps)
    nb_softmax_loglik_linear(h, weight, bias, log_library, px_r, X_csr, eps)
    zinb_softmax_loglik(logits, log_library, px_r, dropout_logits, X_csr, eps)
    poisson_softmax_loglik(logits, log_library, X_csr)
    reparam_kl(q_m, q_v_raw, eps_noise, var_eps)
    dropout(x, p, training)

``sparse_linear``, ``nb_softmax_loglik``, ``zinb_softmax_loglik``, ``poisson_softmax_loglik``
and ``reparam_kl`` have Triton kernels.
``nb_softmax_loglik_linear`` is the composition :func:`scvi_fast.reference.linear_then_nb`
(torch's GEMM, cuBLAS, then the NB kernels, which read bfloat16 logits as they are), and
``dropout`` is the reference's ``F.dropout``: on a GPU neither gains from a kernel of its own.

Each op lives in its own file (``_sparse_linear.py``, ``_nb_loglik.py``, ``_zinb_loglik.py``,
``_poisson_loglik.py``, ``_reparam_kl.py``,
special functions in ``_math.py``) in three tiers: ``@triton.jit`` kernels, host launchers, an
``autograd.Function``. Launch configurations (a default and a few measured candidates per
kernel, ``SCVI_FAST_AUTOTUNE``) are in ``_configs.py``. Importing this package never imports
Triton: the kernel files are loaded on the first call of an op.

Every op takes CSR minibatches under the padded-capacity contract of
:mod:`scvi_fast.reference._csr` and never synchronises with the host, so a training step
built from them can be captured as a CUDA graph.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``; slow, for tests at small shapes). Triton decides when a function is
decorated whether it is compiled or interpreted, its own ``triton.language`` helpers included,
so the variable must be set before ``triton`` is first imported in the process.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from scvi_fast import reference

__all__ = [
    "is_available",
    "unavailable_reason",
    "interpreting",
    "sparse_linear",
    "nb_softmax_loglik",
    "nb_softmax_loglik_linear",
    "poisson_softmax_loglik",
    "zinb_softmax_loglik",
    "reparam_kl",
    "dropout",
]


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read now, as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def unavailable_reason() -> str | None:
    """Why the Triton back-end cannot run here, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return (
            f"triton is not importable ({err}); install it with `pip install triton` "
            "(or `pip install scvi_fast[triton]`)"
        )
    import torch

    if torch.cuda.is_available() or interpreting():
        return None
    return (
        "no CUDA device is visible and TRITON_INTERPRET=1 is not set "
        "(the interpreter runs the kernels on CPU tensors, slowly)"
    )


def is_available() -> bool:
    """True when Triton imports and either a CUDA device exists or ``TRITON_INTERPRET=1``."""
    return unavailable_reason() is None


def _kernels(name: str) -> ModuleType:
    """The kernel file ``name`` (imported on first use)."""
    if not is_available():
        raise ImportError(f"the Triton back-end is unavailable: {unavailable_reason()}")
    return importlib.import_module(f"{__name__}.{name}")


def sparse_linear(
    indptr, indices, values, W, b, cov=None, W_cov=None, transform="log1p", method="auto"
):
    """``y = f(X) @ W + b (+ W_cov[cov])`` for a CSR minibatch; see
    :func:`scvi_fast.reference.sparse_linear`. Gradients flow to ``W``, ``b`` and ``W_cov``.
    ``method="dense"`` (the default for CUDA tensors) densifies the batch on the device and
    runs torch's GEMM; ``"gather"`` sums weight rows at the stored entries."""
    return _kernels("_sparse_linear").sparse_linear(
        indptr, indices, values, W, b, cov, W_cov, transform, method
    )


def nb_softmax_loglik(logits, log_library, px_r, X_csr, eps=1e-8):
    """Per-cell NB log-likelihood under ``mu = exp(l) softmax(logits)``; see
    :func:`scvi_fast.reference.nb_softmax_loglik`. Gradients flow to ``logits``, ``px_r`` and
    ``log_library``. bfloat16 logits are read as they are (float32 result). A ``(B, G)``
    ``px_r`` (per-cell dispersions) runs the ZINB kernels without zero inflation."""
    if px_r.dim() == 2:
        return _kernels("_zinb_loglik").nb_softmax_loglik_rows(logits, log_library, px_r,
                                                               X_csr, eps)
    return _kernels("_nb_loglik").nb_softmax_loglik(logits, log_library, px_r, X_csr, eps)


def zinb_softmax_loglik(logits, log_library, px_r, dropout_logits, X_csr, eps=1e-8):
    """Per-cell zero-inflated NB log-likelihood; see
    :func:`scvi_fast.reference.zinb_softmax_loglik` (``px_r`` ``(G,)`` or ``(B, G)``). Gradients
    flow to ``logits``, ``log_library``, ``px_r`` and ``dropout_logits``."""
    return _kernels("_zinb_loglik").zinb_softmax_loglik(logits, log_library, px_r,
                                                        dropout_logits, X_csr, eps)


def poisson_softmax_loglik(logits, log_library, X_csr):
    """Per-cell Poisson log-likelihood; see :func:`scvi_fast.reference.poisson_softmax_loglik`.
    Gradients flow to ``logits`` and ``log_library``."""
    return _kernels("_poisson_loglik").poisson_softmax_loglik(logits, log_library, X_csr)


def nb_softmax_loglik_linear(h, weight, bias, log_library, px_r, X_csr, eps=1e-8):
    """:func:`nb_softmax_loglik` of ``h @ weight.T + bias``: the composition
    :func:`scvi_fast.reference.linear_then_nb` (the logits stay in the autocast dtype under
    autocast). Gradients flow to ``h``, ``weight``, ``bias``, ``log_library`` and ``px_r``."""
    return reference.linear_then_nb(nb_softmax_loglik, h, weight, bias, log_library, px_r,
                                    X_csr, eps)


def reparam_kl(q_m, q_v_raw, eps_noise, var_eps=reference.VAR_EPS):
    """``(z, kl)`` with ``z = q_m + sqrt(exp(q_v_raw) + var_eps) * eps_noise``; see
    :func:`scvi_fast.reference.reparam_kl`."""
    return _kernels("_reparam_kl").reparam_kl(q_m, q_v_raw, eps_noise, var_eps)


def dropout(x, p, training=True):
    """The reference's dropout (``F.dropout``); see :func:`scvi_fast.reference.dropout`."""
    return reference.dropout(x, p, training)

