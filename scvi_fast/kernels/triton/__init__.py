"""Triton (GPU) back-end of the fused ops.

Exposes ``is_available()``, ``unavailable_reason()`` and the three ops with the reference
signatures (see :mod:`scvi_fast.reference`)::

    sparse_linear(indptr, indices, values, W, b, cov, W_cov, transform, method)
    nb_softmax_loglik(logits, log_library, px_r, X_csr, eps)
    reparam_kl(q_m, q_v_raw, eps_noise)

Each op lives in its own file (``_sparse_linear.py``, ``_nb_loglik.py``, ``_reparam_kl.py``,
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

__all__ = [
    "is_available",
    "unavailable_reason",
    "interpreting",
    "sparse_linear",
    "nb_softmax_loglik",
    "reparam_kl",
    "nb_bytes_moved",
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
    ``log_library``. bfloat16 logits are read as they are (float32 result)."""
    return _kernels("_nb_loglik").nb_softmax_loglik(logits, log_library, px_r, X_csr, eps)


def reparam_kl(q_m, q_v_raw, eps_noise):
    """``(z, kl)`` with ``z = q_m + sqrt(exp(q_v_raw) + 1e-4) * eps_noise``; see
    :func:`scvi_fast.reference.reparam_kl`."""
    return _kernels("_reparam_kl").reparam_kl(q_m, q_v_raw, eps_noise)


def nb_bytes_moved(B, G, nnz, elem=4, index_elem=8, value_elem=4, indptr_elem=None):
    """``(forward, backward)`` compulsory bytes of the NB op, for effective-bandwidth reports.

    For ``B`` cells, ``G`` genes and ``nnz`` stored counts; no Triton needed to call it.
    ``elem``: bytes per logit (4 for float32, 2 for bfloat16); ``index_elem`` / ``value_elem``
    / ``indptr_elem`` (default ``index_elem``): of the CSR arrays.

    What any implementation must move between the processor and memory: forward, the logits
    read once, the CSR, ``px_r`` and the per-cell inputs and outputs (log library in;
    log-likelihood, lse and C out); backward, the logits read once and their gradient written
    once, the CSR, ``px_r`` and its gradient, the per-cell saved values, upstream gradient and
    library gradient. Work the kernels do beyond that (a split forward's second read of its
    chunk, gathers at the non-zeros, the px_r partials) is not counted, so bytes / time is the
    effective bandwidth that compares with the memory's peak (the roofline of the op).
    """
    indptr_elem = index_elem if indptr_elem is None else indptr_elem
    csr = (B + 1) * indptr_elem + nnz * (index_elem + value_elem)
    fwd = B * G * elem + csr + G * 4 + 4 * B * 4
    bwd = 2 * B * G * elem + csr + 2 * G * 4 + 5 * B * 4
    return fwd, bwd
