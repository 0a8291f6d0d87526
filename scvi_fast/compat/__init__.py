"""Interoperability with scvi-tools: parameter layouts, checkpoints, query mapping."""

from scvi_fast.compat._pickle import (
    UnsafeCheckpointError,
    allowed_globals,
    safe_load_checkpoint,
)
from scvi_fast.compat._query import (
    freeze_for_query,
    load_query_data,
    prepare_query_anndata,
    reference_var_names,
)
from scvi_fast.compat._scvi_tools import (
    load_scvi_tools,
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
    "freeze_for_query",
    "load_query_data",
    "load_scvi_tools",
    "module_state_to_scvi_tools",
    "prepare_query_anndata",
    "read_scvi_tools_folder",
    "reference_var_names",
    "safe_load_checkpoint",
    "save_scvi_tools",
    "scvi_tools_config_from_state",
    "scvi_tools_registry",
    "scvi_tools_state",
    "scvi_tools_state_to_module",
    "unused_scvi_tools_heads",
]
