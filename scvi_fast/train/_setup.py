"""What a training run is checked and built with before its first step: the training set
(degenerate sizes refused), the device, the optimiser; and the error a non-finite step raises."""

from __future__ import annotations

import torch


_NONFINITE_HINT = (
    "Likely causes: counts changed after setup (negative, NaN or huge values: run "
    "scvi_fast.data.check_counts on them), a learning rate too high for this data, or "
    "precision='bf16-mixed' overflowing; resume=True continues from the last checkpoint once "
    "the cause is fixed."
)


def _check_trainable(loader) -> None:
    """Refuse, before anything runs, a training set BatchNorm cannot train on: no cells, or a
    minibatch of a single cell (its batch statistics are undefined)."""
    n, bs = int(loader.n_cells), int(loader.batch_size)
    if n == 0:
        raise ValueError(
            "there are no cells to train on (the data is empty, or train_size leaves none); "
            "check the data's shape and train_size"
        )
    if n % bs == 1:
        raise ValueError(
            f"training needs at least 2 cells in every minibatch (BatchNorm normalises over "
            f"the minibatch), but {n} training cells at batch_size={bs} leave a last minibatch "
            f"of 1 cell; {'add cells' if n == 1 else 'change batch_size or train_size'}"
        )


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss or gradient (see the message for where and why)."""


#: the per-cell loss terms summed over an epoch (device-side sums, read once per epoch)
METRICS = ("elbo", "reconstruction_loss", "kl_local")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the first CUDA device when one is present, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def make_adam(params, lr: float, eps: float, weight_decay: float,
              capturable: bool = False, optimizer: str = "Adam") -> torch.optim.Optimizer:
    """Adam (or AdamW: ``optimizer="AdamW"``) with scvi-tools' settings, using the fused
    single-kernel update where available.

    The fused update does the same arithmetic in one pass over each tensor (on a 2-core
    CPU about 8x faster than the multi-tensor path at the Census shape). ``capturable`` keeps
    the step count on the device, so that the update can be captured in a CUDA graph (set on
    CUDA whatever the step mode, so that graph and eager runs do the same arithmetic).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Optimizer not understood: {optimizer!r} (use 'Adam' or 'AdamW')")
    cls = OPTIMIZERS[optimizer]
    params = list(params)
    kw = dict(lr=lr, eps=eps, weight_decay=weight_decay)
    if capturable:
        kw["capturable"] = True
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kw)
