"""A plain PyTorch training loop for the VAE: no Lightning, checkpoints that resume."""

from scvi_fast.train._checkpoint import atomic_torch_save, load_checkpoint
from scvi_fast.train._trainer import NonFiniteError, Trainer, resolve_device

__all__ = ["NonFiniteError", "Trainer", "atomic_torch_save", "load_checkpoint", "resolve_device"]
