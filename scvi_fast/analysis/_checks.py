"""Outputs are never handed back with NaN or infinite values silently."""

from __future__ import annotations

import numpy as np


class NonFiniteOutputError(FloatingPointError):
    """A computed output (latent, expression, ELBO) holds NaN or infinite values."""


def check_finite(values, what: str) -> None:
    """Raise :class:`NonFiniteOutputError` naming ``what`` if ``values`` has a non-finite entry.

    Such values come from damaged weights or counts that changed after setup; returning them
    would let NaN flow into clustering or differential expression unnoticed.
    """
    arr = np.asarray(values)
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise NonFiniteOutputError(
            f"{what} holds {n_bad} NaN or infinite values. The model's weights or these cells' "
            "counts are damaged: check the counts with scvi_fast.data.check_counts and that "
            "the model loads (SCVI.load verifies its weights)."
        )
