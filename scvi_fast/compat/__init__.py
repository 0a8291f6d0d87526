"""Interoperability with scvi-tools: parameter layouts, checkpoints, query mapping."""

from scvi_fast.compat._state import (
    module_state_to_scvi_tools,
    scvi_tools_config_from_state,
    scvi_tools_state_to_module,
    unused_scvi_tools_heads,
)

__all__ = [
    "module_state_to_scvi_tools",
    "scvi_tools_config_from_state",
    "scvi_tools_state_to_module",
    "unused_scvi_tools_heads",
]
