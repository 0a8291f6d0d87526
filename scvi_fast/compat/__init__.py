"""Interoperability with scvi-tools: parameter layouts and checkpoints (read safely, written in
scvi-tools' layout). Query mapping lives with the model (:mod:`scvi_fast.model`) and its frozen
layers in :mod:`scvi_fast.module`."""

from scvi_fast.compat._pickle import (
    UnsafeCheckpointError,
    allowed_globals,
    safe_load_checkpoint,
)
from scvi_fast.compat._scvi_tools import (
    read_scvi_tools_folder,
    save_scvi_tools,
    scvi_tools_registry,
    scvi_tools_state,
)
from scvi_fast.compat._state import (
    module_state_to_scvi_tools,
    scvi_tools_config_from_state,
    scvi_tools_state_to_module,
    unused_scvi_tools_heads,
)

__all__ = [
    "UnsafeCheckpointError",
    "allowed_globals",
    "module_state_to_scvi_tools",
    "read_scvi_tools_folder",
    "safe_load_checkpoint",
    "save_scvi_tools",
    "scvi_tools_config_from_state",
    "scvi_tools_registry",
    "scvi_tools_state",
    "scvi_tools_state_to_module",
    "unused_scvi_tools_heads",
]
