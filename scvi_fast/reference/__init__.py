"""Pure-PyTorch ground truth for every fused op, and the ``impl="torch"`` back-end.

These functions are the specification: tests compare every fast path against
them (in float64 where it matters), benchmarks use them as the baseline, and
``impl="torch"`` dispatches to them. As a back-end this package follows the contract of
:mod:`scvi_fast.functional` (every op of ``functional.OPS`` with its signature, and
:func:`is_available` / :func:`unavailable_reason`), like the fast back-ends in
:mod:`scvi_fast.kernels`.

Beside the ops: the CSR helpers of the padded-capacity contract (``_csr.py``), and what the
fast back-ends are judged by in tests and benchmarks: the tolerance table and error measures
(``_accuracy.py``) and random CSR count batches (``_random.py``).
"""

from scvi_fast.reference._csr import csr_masked, csr_parts, csr_row_ids, csr_to_dense, csr_valid
from scvi_fast.reference._dropout import dropout
from scvi_fast.reference._nb import (
    LOW_PRECISION,
    linear_then_nb,
    log_nb_positive,
    nb_bytes_moved,
    nb_softmax_loglik,
    nb_softmax_loglik_linear,
)
from scvi_fast.reference._zinb import log_zinb_positive, poisson_softmax_loglik, zinb_softmax_loglik
from scvi_fast.reference._reparam import reparam_kl, VAR_EPS
from scvi_fast.reference._sparse_linear import METHODS as SPARSE_LINEAR_METHODS
from scvi_fast.reference._sparse_linear import (
    check_cov,
    covariate_rows,
    resolve_method,
    sparse_linear,
    split_cov,
)


def is_available() -> bool:
    """Always True: the reference needs nothing but torch."""
    return True


def unavailable_reason() -> None:
    """Always None (see :func:`is_available`)."""
    return None


__all__ = [
    "check_cov",
    "covariate_rows",
    "split_cov",
    "csr_masked",
    "csr_parts",
    "csr_row_ids",
    "csr_to_dense",
    "csr_valid",
    "dropout",
    "is_available",
    "linear_then_nb",
    "log_nb_positive",
    "LOW_PRECISION",
    "nb_bytes_moved",
    "nb_softmax_loglik",
    "nb_softmax_loglik_linear",
    "log_zinb_positive",
    "poisson_softmax_loglik",
    "zinb_softmax_loglik",
    "reparam_kl",
    "resolve_method",
    "sparse_linear",
    "SPARSE_LINEAR_METHODS",
    "unavailable_reason",
    "VAR_EPS",
]
