"""Native CPU back-end: C++ kernels (``csrc/``) compiled into a torch extension.

The extension is loaded, or built just in time, on the first call of
:func:`is_available` or of an op (see :mod:`scvi_fast._native`); importing this
package compiles nothing. Each op lives in its own module with its
``autograd.Function``, with the signature of the back-end contract (see
:mod:`scvi_fast.functional`). Every op has a fused kernel; ``nb_softmax_loglik_linear``
(under autocast, for mixed dtypes or a ``(B, G)`` px_r) and ``dropout`` (under autocast or for dtypes other
than float32 / float64) fall back to the reference's composition in their own module.
"""

from scvi_fast._native import is_available, load, unavailable_reason
from scvi_fast.kernels.native.dropout import dropout
from scvi_fast.kernels.native.nb_linear_loglik import nb_softmax_loglik_linear
from scvi_fast.kernels.native.nb_softmax_loglik import nb_softmax_loglik
from scvi_fast.kernels.native.poisson_softmax_loglik import poisson_softmax_loglik
from scvi_fast.kernels.native.reparam_kl import reparam_kl
from scvi_fast.kernels.native.sparse_linear import sparse_linear
from scvi_fast.kernels.native.zinb_softmax_loglik import zinb_softmax_loglik

__all__ = [
    "dropout",
    "is_available",
    "load",
    "nb_softmax_loglik",
    "nb_softmax_loglik_linear",
    "poisson_softmax_loglik",
    "zinb_softmax_loglik",
    "reparam_kl",
    "sparse_linear",
    "unavailable_reason",
]
