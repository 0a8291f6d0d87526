"""Reading scvi-tools ``model.pt`` files without executing anything they name.

An scvi-tools checkpoint is a torch zip file whose ``data.pkl`` is a pickle of
``{"model_state_dict", "var_names", "attr_dict"}``. A pickle may name any
importable callable and have it called while loading, so a file from the
internet must not go through plain ``pickle``. torch's ``weights_only=True``
refuses what scvi-tools keeps in ``attr_dict`` (pandas DataFrames of the
training history, a ``collections.defaultdict`` of registries) even when those
classes are allow-listed, so checkpoints are read here with
``torch.load(..., weights_only=False, pickle_module=restricted)``, where every
global the pickle names is looked up in :data:`ALLOWED_GLOBALS` and anything
else stops the load before it is resolved, let alone called.

The allow-list is what scvi-tools 1.x writes (checked on 1.4.2 checkpoints),
with the module paths of older numpy (``numpy.core``) and pandas releases, and the
top-level names pandas 3 writes (``pandas.DataFrame``), with its string arrays (plain or,
with pyarrow installed, pyarrow-backed).
Each entry is a data constructor: none of them reads or writes files, imports
modules or evaluates code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import types
import zipfile
from pathlib import Path

import torch


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The checkpoint's pickle names a global outside the allow-list; nothing was executed."""


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    # Protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, "latin1")``.
    # Only that codec is allowed: others (zlib, base64, ...) are not data constructors.
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise UnsafeCheckpointError(
            f"_codecs.encode is only allowed with the latin1 codec on a str (got {encoding!r})"
        )
    return obj.encode("latin1", errors)


def _unpickle_ndarray_backed(cls, checksum, state):
    # pandas' Cython reconstructor of array-backed extension arrays (Categorical, StringArray):
    # it creates ``cls`` without calling its constructor, so only those two classes may pass.
    import pandas as pd
    from pandas._libs.arrays import __pyx_unpickle_NDArrayBacked
    from pandas.arrays import StringArray

    if cls not in (pd.Categorical, StringArray):
        raise UnsafeCheckpointError(
            f"__pyx_unpickle_NDArrayBacked is only allowed for Categorical and StringArray (got {cls!r})"
        )
    return __pyx_unpickle_NDArrayBacked(cls, checksum, state)


def _add_arrow_strings(add) -> None:
    """pyarrow-backed strings (pandas 3's ``str`` dtype when pyarrow is installed).

    A pyarrow array is rebuilt from its buffers with ``pyarrow.lib._restore_array``, which does
    not check that the buffers hold what the header claims; every rebuilt array is validated in
    full here, so a forged length or offset is an error instead of a read past a buffer.
    """
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        return
    from pandas.arrays import ArrowStringArray

    def restore_array(data):
        import pyarrow.lib as pa_lib

        arr = pa_lib._restore_array(data)
        arr.validate(full=True)
        return arr

    def py_buffer(obj):
        import pyarrow

        if not isinstance(obj, (bytes, bytearray)):
            raise UnsafeCheckpointError(f"pyarrow.py_buffer is only allowed on bytes (got {type(obj)})")
        return pyarrow.py_buffer(obj)

    def type_for_alias(name):
        import pyarrow

        if not isinstance(name, str):
            raise UnsafeCheckpointError("pyarrow.type_for_alias is only allowed on a str")
        return pyarrow.type_for_alias(name)

    add("pandas.arrays", "ArrowStringArray", ArrowStringArray)
    add("pandas.core.arrays.string_arrow", "ArrowStringArray", ArrowStringArray)
    add("pyarrow.lib", "_restore_array", restore_array)
    add("pyarrow.lib", "py_buffer", py_buffer)
    add("pyarrow.lib", "type_for_alias", type_for_alias)


def _add_pandas(add) -> None:
    """pandas DataFrames / Series / Index / Categorical (the training history, setup columns)."""
    import pandas as pd
    from pandas._libs import internals as libinternals
    from pandas.core import internals as core_internals
    from pandas.core.indexes import base as ibase

    add("pandas.core.frame", "DataFrame", pd.DataFrame)
    add("pandas.core.series", "Series", pd.Series)
    for name, obj in (("Index", pd.Index), ("_new_Index", ibase._new_Index)):
        add("pandas.core.indexes.base", name, obj)
    add("pandas.core.indexes.range", "RangeIndex", pd.RangeIndex)
    add("pandas.core.indexes.category", "CategoricalIndex", pd.CategoricalIndex)
    add("pandas.core.indexes.multi", "MultiIndex", pd.MultiIndex)
    for old in ("Int64Index", "UInt64Index", "Float64Index", "NumericIndex"):
        add("pandas.core.indexes.numeric", old, pd.Index)  # removed in pandas 2
    add("pandas.core.arrays.categorical", "Categorical", pd.Categorical)
    add("pandas.core.dtypes.dtypes", "CategoricalDtype", pd.CategoricalDtype)
    # pandas 3 pickles its public classes under their top-level names (``pandas.DataFrame``)
    for name in ("DataFrame", "Series", "Index", "RangeIndex", "CategoricalIndex", "MultiIndex",
                 "Categorical", "CategoricalDtype", "StringDtype", "NA"):
        add("pandas", name, getattr(pd, name))
    # string columns and labels: pandas 3's default ``str`` dtype, or pandas 2's ``"string"``
    from pandas.arrays import StringArray

    add("pandas.arrays", "StringArray", StringArray)
    add("pandas.core.arrays.string_", "StringArray", StringArray)
    add("pandas.core.arrays.string_", "StringDtype", pd.StringDtype)
    add("pandas._libs.missing", "NA", pd.NA)
    add("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked", _unpickle_ndarray_backed)
    _add_arrow_strings(add)
    add("pandas._libs.internals", "_unpickle_block", libinternals._unpickle_block)
    for mod in ("pandas.core.internals.managers", "pandas.core.internals"):
        add(mod, "BlockManager", core_internals.BlockManager)
        add(mod, "SingleBlockManager", core_internals.SingleBlockManager)
    for name in ("new_block", "ObjectBlock", "NumpyBlock"):
        obj = getattr(__import__("pandas.core.internals.blocks", fromlist=[name]), name, None)
        if obj is not None:
            add("pandas.core.internals.blocks", name, obj)


def _build_allow_list() -> dict[tuple[str, str], object]:
    import builtins

    import numpy as np

    allowed: dict[tuple[str, str], object] = {}

    def add(module: str, name: str, obj) -> None:
        allowed[(module, name)] = obj

    for name in ("dict", "list", "tuple", "set", "frozenset", "slice", "bytes", "bytearray",
                 "complex", "int", "float", "str", "bool", "range"):
        add("builtins", name, getattr(builtins, name))
        add("__builtin__", name, getattr(builtins, name))
    add("_codecs", "encode", _latin1_encode)
    add("collections", "OrderedDict", collections.OrderedDict)
    add("collections", "defaultdict", collections.defaultdict)

    # numpy arrays, dtypes and scalars (numpy 2 writes ``numpy._core``, numpy 1 ``numpy.core``)
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        add(mod, "_reconstruct", reconstruct)
        add(mod, "scalar", scalar)
    add("numpy", "ndarray", np.ndarray)
    add("numpy", "dtype", np.dtype)
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "ObjectDType",
                 "BoolDType", "StrDType", "BytesDType", "UInt8DType", "Int8DType"):
        dt = getattr(np.dtypes, name, None)
        if dt is not None:
            add("numpy.dtypes", name, dt)

    _add_pandas(add)

    # torch tensors (storages are resolved by torch.load itself)
    import torch._utils as tu

    for name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(tu, name):
            add("torch._utils", name, getattr(tu, name))
    add("torch", "Size", torch.Size)
    add("torch.nn.parameter", "Parameter", torch.nn.Parameter)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                 "int8", "uint8", "bool"):
        add("torch", name, getattr(torch, name))
    return allowed


_ALLOWED: dict[tuple[str, str], object] | None = None


def allowed_globals() -> dict[tuple[str, str], object]:
    """The allow-list: ``{(module, name): object}`` of every global a checkpoint may name."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _build_allow_list()
    return _ALLOWED


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only allow-listed globals."""

    def find_class(self, module: str, name: str):
        obj = allowed_globals().get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"refusing to load: the pickle needs the global '{module}.{name}', which is not "
                "on scvi_fast's allow-list of what scvi-tools checkpoints contain; nothing was "
                "executed. If you trust this file, open it with torch.load(path, "
                "weights_only=False) in scvi-tools and save it again."
            )
        return obj


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs):
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


#: a module with the interface torch.load expects of ``pickle_module``
restricted_pickle = types.ModuleType("scvi_fast_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = _restricted_loads
restricted_pickle.UnpicklingError = pickle.UnpicklingError
restricted_pickle.__name__ = "scvi_fast_restricted_pickle"


def safe_load_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """Read an scvi-tools ``model.pt`` through the restricted unpickler.

    Raises
    ------
    UnsafeCheckpointError
        The file names a global outside :func:`allowed_globals` (the message names it).
    ValueError
        The file is not a torch zip checkpoint.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a torch zip checkpoint (scvi-tools >= 0.15 writes one); legacy "
            "pickles are not read"
        )
    # TORCH_FORCE_WEIGHTS_ONLY_LOAD asks torch never to run arbitrary pickles; it would also
    # reject this call, whose pickle module admits data constructors only. Honour the intent.
    forced = os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    try:
        return torch.load(path, map_location=map_location, weights_only=False,
                          pickle_module=restricted_pickle)
    finally:
        if forced is not None:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced
