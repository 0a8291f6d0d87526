"""The user-facing :class:`SCVI` model and its parts.

Composed of small modules: the typed :class:`Registry` (``_registry``), data access
(``_data``), defaults, presets and :class:`TrainConfig` (``_config``), training
(``_training``), inference adapters over :mod:`scvi_fast.analysis` (``_inference``),
save/load (``_io``) and reference mapping (``_query``).
"""

from scvi_fast.model._config import (
    INFERENCE_BATCH_SIZE,
    MODEL_DEFAULTS,
    PRESETS,
    TRAIN_DEFAULTS,
    TrainConfig,
)
from scvi_fast.model._io import FORMAT_VERSION
from scvi_fast.model._registry import SETUP_KEY, Registry
from scvi_fast.model._scvi import SCVI

__all__ = [
    "FORMAT_VERSION",
    "INFERENCE_BATCH_SIZE",
    "MODEL_DEFAULTS",
    "PRESETS",
    "Registry",
    "SCVI",
    "SETUP_KEY",
    "TRAIN_DEFAULTS",
    "TrainConfig",
]
