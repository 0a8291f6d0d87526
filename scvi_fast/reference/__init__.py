"""Pure-PyTorch ground truth for every fused op.

These functions are the specification: tests compare every fast path against
them (in float64 where it matters), benchmarks use them as the baseline, and
``impl="torch"`` dispatches to them.
"""

from scvi_fast.reference._csr import csr_masked, csr_parts, csr_row_ids, csr_to_dense, csr_valid
from scvi_fast.reference._nb import (
    log_nb_positive,
    nb_softmax_loglik,
    nb_softmax_loglik_linear,
    output_logits,
)
from scvi_fast.reference._reparam import reparam_kl, VAR_EPS
from scvi_fast.reference._sparse_linear import METHODS as SPARSE_LINEAR_METHODS
from scvi_fast.reference._sparse_linear import resolve_method, sparse_linear

__all__ = [
    "csr_masked",
    "csr_parts",
    "csr_row_ids",
    "csr_to_dense",
    "csr_valid",
    "log_nb_positive",
    "nb_softmax_loglik",
    "nb_softmax_loglik_linear",
    "output_logits",
    "reparam_kl",
    "resolve_method",
    "sparse_linear",
    "SPARSE_LINEAR_METHODS",
    "VAR_EPS",
]
