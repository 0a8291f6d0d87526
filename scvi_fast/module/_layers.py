"""Layers of the scVI networks, with the weight layouts the fused ops want.

scvi-tools builds every hidden layer as ``Linear -> BatchNorm1d(eps=1e-3,
momentum=0.01) -> ReLU -> Dropout`` and injects the batch as a one-hot
concatenated after the layer input. Here the first encoder layer reads the CSR
counts directly (gene-major weight, ``(G, H)``) and the batch columns of a
decoder layer are a separate ``(K, H)`` table that is gathered, not multiplied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scvi_fast import functional as F_ops

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
    """

    def __init__(self, n_in: int, n_out: int, transform: str = "log1p", impl: str = "auto",
                 method: str = "auto"):
        super().__init__()
        self.n_in, self.n_out, self.transform, self.impl = n_in, n_out, transform, impl
        self.method = method
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))
        _linear_init_(self.weight, self.bias, n_in)

    def forward(self, x) -> torch.Tensor:
        return F_ops.sparse_linear(
            x.indptr, x.indices, x.values, self.weight, self.bias,
            transform=self.transform, impl=self.impl, method=self.method,
        )


class CovariateLinear(nn.Module):
    """``y = h @ weight.T + bias + weight_cov[cov]``: a Linear on ``[h, onehot(cov)]``.

    ``weight`` is ``(n_out, n_in)`` as in ``nn.Linear``; ``weight_cov`` is
    ``(n_cov, n_out)`` (the one-hot columns of scvi-tools' weight, transposed so
    each category's vector is contiguous). With ``n_cov == 0`` it is a plain Linear.
    """

    def __init__(self, n_in: int, n_out: int, n_cov: int = 0):
        super().__init__()
        self.n_in, self.n_out, self.n_cov = n_in, n_out, n_cov
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out))
        _linear_init_(self.weight, self.bias, n_in + n_cov)
        if n_cov > 0:
            self.weight_cov = nn.Parameter(torch.empty(n_cov, n_out))
            _linear_init_(self.weight_cov, None, n_in + n_cov)
        else:
            self.register_parameter("weight_cov", None)

    def forward(self, h: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.nn.functional.linear(h, self.weight, self.bias)
        if self.weight_cov is not None:
            if cov is None:
                raise ValueError("this layer was built with covariates; pass their codes")
            # A row gather of the (K, H) table; embedding's backward is a sorted
            # segment sum, far faster on the CPU than index_select's scatter.
            y = y + torch.nn.functional.embedding(cov.reshape(-1), self.weight_cov)
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
