"""Pure-PyTorch ground truth for every fused op.

These functions are the specification: tests compare every fast path against
them (in float64 where it matters), benchmarks use them as the baseline, and
``impl="torch"`` dispatches to them.
"""

from scvi_fast.reference._csr import csr_parts, csr_to_dense, csr_row_ids
from scvi_fast.reference._nb import log_nb_positive, nb_softmax_loglik, nb_softmax_loglik_linear, output_logits
from scvi_fast.reference._reparam import reparam_kl, VAR_EPS
from scvi_fast.reference._sparse_linear import sparse_linear

__all__ = [
    "csr_parts",
    "csr_to_dense",
    "csr_row_ids",
    "log_nb_positive",
    "nb_softmax_loglik",
    "nb_softmax_loglik_linear",
    "output_logits",
    "reparam_kl",
    "sparse_linear",
    "VAR_EPS",
]
