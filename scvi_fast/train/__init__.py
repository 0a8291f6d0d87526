"""A plain PyTorch training loop for the VAE: no Lightning, checkpoints that resume."""

from scvi_fast.train._checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
from scvi_fast.train._setup import NonFiniteError, resolve_device
from scvi_fast.train._trainer import Trainer

__all__ = ["CheckpointError", "NonFiniteError", "Trainer", "atomic_torch_save", "load_checkpoint", "resolve_device"]
