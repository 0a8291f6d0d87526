"""Layers of the scVI networks, with the weight layouts the fused ops want.

scvi-tools builds every hidden layer as ``Linear -> BatchNorm1d(eps=1e-3,
momentum=0.01) -> ReLU -> Dropout`` and injects the batch as a one-hot
concatenated after the layer input (and, in the first layer, the continuous
covariates before them: ``[h, cont, onehot(batch), onehot(cat_1), ...]``). Here the
first encoder layer reads the CSR counts directly (gene-major weight, ``(G, H)``),
the one-hot columns of every categorical covariate are one stacked ``(K, H)`` table
that is gathered, not multiplied (codes offset into it, see :func:`covariate_rows`),
and the continuous columns are an ordinary dense term.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scvi_fast import functional as F_ops
from scvi_fast.reference import covariate_rows

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _linear_init_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # nn.Linear's default initialisation (kaiming_uniform with a=sqrt(5)) written
    # against the true fan-in, so that split layouts start like scvi-tools' layers.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class SparseInputLinear(nn.Module):
    """``y = f(X_csr) @ weight + bias`` with ``weight`` stored gene-major ``(n_in, n_out)``.

    Equivalent to ``nn.Linear(n_in, n_out)`` applied to ``f(X)`` with
    ``weight = linear.weight.T``; ``f`` is ``log1p`` for scVI's encoder. ``method`` is
    :func:`scvi_fast.functional.sparse_linear`'s (``"auto"``: a densified batch and a GEMM
    on a GPU, a gather over the stored entries on the CPU).

    With covariates (scvi-tools' ``encode_covariates=True``) ``weight_cont`` ``(n_cont,
    n_out)`` multiplies the continuous covariates and ``weight_cov`` ``(n_cov, n_out)`` holds
    the stacked one-hot columns of the categorical ones, gathered by the fused op.
    """

    def __init__(self, n_in: int, n_out: int, transform: str = "log1p", impl: str = "auto",
                 method: str = "auto", n_cov: int = 0, n_cont: int = 0):
        super().__init__()
        self.n_in, self.n_out, self.transform, self.impl = n_in, n_out, transform, impl
        self.method, self.n_cov, self.n_cont = method, n_cov, n_cont
        fan_in = n_in + n_cov + n_cont
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))
        _linear_init_(self.weight, self.bias, fan_in)
        _covariate_params_(self, n_out, n_cov, n_cont, fan_in, cont_shape=(n_cont, n_out))

    def forward(self, x, cov: torch.Tensor | None = None,
                cont: torch.Tensor | None = None) -> torch.Tensor:
        _check_covariates(self, cov, cont)
        y = F_ops.sparse_linear(
            x.indptr, x.indices, x.values, self.weight, self.bias,
            cov=cov if self.weight_cov is not None else None, W_cov=self.weight_cov,
            transform=self.transform, impl=self.impl, method=self.method,
        )
        if self.weight_cont is not None:
            y = y + (cont.to(self.weight_cont.dtype) @ self.weight_cont).to(y.dtype)
        return y


def _covariate_params_(layer: nn.Module, n_out: int, n_cov: int, n_cont: int, fan_in: int,
                       cont_shape: tuple[int, int]) -> None:
    """``weight_cov`` ``(n_cov, n_out)`` and ``weight_cont`` (``cont_shape``), or None each."""
    if n_cov > 0:
        layer.weight_cov = nn.Parameter(torch.empty(n_cov, n_out))
        _linear_init_(layer.weight_cov, None, fan_in)
    else:
        layer.register_parameter("weight_cov", None)
    if n_cont > 0:
        layer.weight_cont = nn.Parameter(torch.empty(*cont_shape))
        _linear_init_(layer.weight_cont, None, fan_in)
    else:
        layer.register_parameter("weight_cont", None)


def _check_covariates(layer: nn.Module, cov, cont) -> None:
    if layer.weight_cov is not None and cov is None:
        raise ValueError("this layer was built with categorical covariates; pass their codes")
    if layer.weight_cont is not None and cont is None:
        raise ValueError("this layer was built with continuous covariates; pass their values")


class CovariateLinear(nn.Module):
    """``y = h @ weight.T + cont @ weight_cont.T + bias + sum_c weight_cov[cov[:, c]]``: a
    Linear on ``[h, cont, onehot(cov_1), onehot(cov_2), ...]``.

    ``weight`` is ``(n_out, n_in)`` as in ``nn.Linear``, ``weight_cont`` ``(n_out, n_cont)``
    (the continuous columns of scvi-tools' weight); ``weight_cov`` is ``(n_cov, n_out)`` (the
    one-hot columns, transposed so each category's vector is contiguous; several categorical
    covariates are stacked, their codes offset). Without covariates it is a plain Linear.
    """

    def __init__(self, n_in: int, n_out: int, n_cov: int = 0, n_cont: int = 0):
        super().__init__()
        self.n_in, self.n_out, self.n_cov, self.n_cont = n_in, n_out, n_cov, n_cont
        fan_in = n_in + n_cov + n_cont
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out))
        _linear_init_(self.weight, self.bias, fan_in)
        _covariate_params_(self, n_out, n_cov, n_cont, fan_in, cont_shape=(n_out, n_cont))

    def forward(self, h: torch.Tensor, cov: torch.Tensor | None = None,
                cont: torch.Tensor | None = None) -> torch.Tensor:
        _check_covariates(self, cov, cont)
        y = torch.nn.functional.linear(h, self.weight, self.bias)
        if self.weight_cont is not None:
            y = y + torch.nn.functional.linear(cont.to(h.dtype), self.weight_cont)
        if self.weight_cov is not None:
            y = y + covariate_rows(cov, self.weight_cov)
        return y


class OutputLinear(nn.Module):
    """``nn.Linear(n_in, n_out)`` whose ``(n_out, n_in)`` weight is stored column-major.

    The parameter is ``weight_t``, an ``(n_in, n_out)`` row-major array; ``weight`` is its
    transposed view, and ``state_dict`` / ``load_state_dict`` speak of ``weight`` with
    ``nn.Linear``'s shape, so checkpoints are unchanged. Reason: for the decoder's
    ``H -> G`` output layer the weight gradient ``D^T h`` comes out of the CPU GEMM fastest
    as ``(H, G)``; with a row-major parameter autograd would copy it into ``(G, H)`` order
    (a 4M-element transposing copy per step), and the fused Adam update would copy a
    strided parameter again. Initialised exactly like ``nn.Linear``.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        w = torch.empty(n_out, n_in)
        self.bias = nn.Parameter(torch.empty(n_out))
        _linear_init_(w, self.bias, n_in)  # drawn in nn.Linear's order: same values per seed
        self.weight_t = nn.Parameter(w.t().contiguous())

    @property
    def weight(self) -> torch.Tensor:
        """``(n_out, n_in)``, a transposed view of ``weight_t``."""
        return self.weight_t.t()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination.pop(prefix + "weight_t")
        destination[prefix + "weight"] = w.t().contiguous() if not keep_vars else w.t()
        destination.move_to_end(prefix + "bias")  # nn.Linear's key order

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if prefix + "weight" in mine:
            w = mine.pop(prefix + "weight")
            if w.dim() == 2 and w.shape == (self.n_out, self.n_in):
                w = w.t()
            else:  # keep the shape error in nn.Linear's terms
                error_msgs.append(
                    f"size mismatch for {prefix}weight: copying a param with shape "
                    f"{tuple(w.shape)}, the shape in current model is ({self.n_out}, {self.n_in})."
                )
                w = self.weight_t
            mine[prefix + "weight_t"] = w
        super()._load_from_state_dict(mine, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing_keys[:] = [prefix + "weight" if k == prefix + "weight_t" else k
                           for k in missing_keys]


class DenseBlock(nn.Module):
    """``BatchNorm1d -> ReLU -> Dropout`` after a linear map (scvi-tools' FCLayers tail)."""

    def __init__(self, n_out: int, dropout_rate: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.norm = nn.BatchNorm1d(n_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.dropout_rate = dropout_rate
        self.impl = impl

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm(y))
        if self.dropout_rate > 0:
            y = F_ops.dropout(y, self.dropout_rate, self.training, impl=self.impl)
        return y
