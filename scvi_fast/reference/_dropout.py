"""Dropout, as torch computes it (the op set of every back-end includes it)."""

from __future__ import annotations

import torch


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, training)``: zero each element with probability
    ``p`` and scale the others by ``1 / (1 - p)``; the identity when not ``training``."""
    return torch.nn.functional.dropout(x, p, training)
