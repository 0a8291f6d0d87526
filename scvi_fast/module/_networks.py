"""The encoder and decoder stacks of scVI (layers in :mod:`scvi_fast.module._layers`)."""

from __future__ import annotations

import torch
from torch import nn

from scvi_fast.module._layers import CovariateLinear, DenseBlock, OutputLinear, SparseInputLinear


class Encoder(nn.Module):
    """``x -> log1p -> [Linear BN ReLU Dropout] x n_layers -> (q_m, raw q_v)``.

    With ``n_cov`` / ``n_cont`` (scvi-tools' ``encode_covariates=True``) the first layer also
    reads the categorical codes and the continuous covariates; the later layers read the codes
    when ``deep`` (``deeply_inject_covariates``).
    """

    def __init__(self, n_input, n_latent, n_hidden, n_layers, dropout_rate, impl,
                 n_cov: int = 0, n_cont: int = 0, deep: bool = True):
        super().__init__()
        self.first = SparseInputLinear(n_input, n_hidden, transform="log1p", impl=impl,
                                       n_cov=n_cov, n_cont=n_cont)
        self.linears = nn.ModuleList(
            [CovariateLinear(n_hidden, n_hidden, n_cov if deep else 0)
             for _ in range(n_layers - 1)]
        )
        self.blocks = nn.ModuleList(
            [DenseBlock(n_hidden, dropout_rate, impl=impl) for _ in range(n_layers)]
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.var = nn.Linear(n_hidden, n_latent)

    def forward(self, x, need_var: bool = True, cov: torch.Tensor | None = None,
                cont: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.blocks[0](self.first(x, cov, cont))
        for linear, block in zip(self.linears, self.blocks[1:]):
            h = block(linear(h, cov))
        return self.mean(h), (self.var(h) if need_var else None)


class Decoder(nn.Module):
    """``[z, cont, onehot(batch), onehot(cat_1)...] -> [Linear BN ReLU] x n_layers -> logits``.

    The categorical one-hots enter every layer when ``deep`` (``deeply_inject_covariates``),
    else the first only; the continuous covariates enter the first layer only (scvi-tools
    concatenates them to ``z``).
    """

    def __init__(self, n_latent, n_output, n_hidden, n_layers, n_cov, n_cont: int = 0,
                 deep: bool = True):
        super().__init__()
        dims = [n_latent] + [n_hidden] * n_layers
        self.linears = nn.ModuleList(
            [CovariateLinear(dims[i], dims[i + 1], n_cov if (i == 0 or deep) else 0,
                             n_cont if i == 0 else 0) for i in range(n_layers)]
        )
        self.blocks = nn.ModuleList([DenseBlock(n_hidden, 0.0) for _ in range(n_layers)])
        self.scale = OutputLinear(n_hidden, n_output)  # column-major weight, see there

    def hidden(self, z: torch.Tensor, batch: torch.Tensor | None,
               cont: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer, the input of the output layer ``scale``. ``batch``: the
        (offset, stacked) categorical codes, ``cont``: the continuous covariates."""
        h = z
        for i, (linear, block) in enumerate(zip(self.linears, self.blocks)):
            h = block(linear(h, batch, cont if i == 0 else None))
        return h

    def forward(self, z: torch.Tensor, batch: torch.Tensor | None,
                cont: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale(self.hidden(z, batch, cont))
