"""Every Triton kernel compiles for a real GPU (sm_90: H100 / H200), all the way to a cubin.

Triton compiles ahead of time without a device: this catches what the interpreter cannot
(lowering, libdevice calls, register allocation by ptxas). It needs the kernels decorated as
compiled functions, so it skips when the run itself is interpreted (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from _triton_helpers import HAS_TRITON, INTERPRET

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this run"),
    pytest.mark.skipif(
        HAS_TRITON and importlib.util.find_spec("triton.backends.nvidia") is None,
        reason="triton has no NVIDIA backend here",
    ),
]

INT_POINTERS = {"indptr_ptr", "indices_ptr", "seg_ptr", "idx_ptr", "cov_ptr"}


def _compile(kernel, float_ty: str, config: dict):
    """Compile ``kernel`` for sm_90 with float pointers of ``float_ty``; ``config`` holds the
    constexpr arguments and ``num_warps``, as the launchers pass them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {k: v for k, v in config.items() if k != "num_warps"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in INT_POINTERS else f"*{float_ty}"
        else:
            signature[name] = "i32"
    src = ASTSource(kernel, signature, constexprs=constexprs)
    options = {"num_warps": config.get("num_warps", 4)}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert len(compiled.asm["cubin"]) > 0
    return compiled


def _cases():
    """(name, kernel, float type, config) at the Census shape (G=8000, H=512, Z=50)."""
    import triton.language as tl

    from scvi_fast.kernels.triton import _math, _nb_loglik, _reparam_kl, _sparse_linear

    G, H, Z = 8000, 512, 50
    cases = []
    for float_ty, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
        cases += [
            (f"special-{float_ty}", _math._special_kernel, float_ty, dict(BLOCK=256)),
            (f"reparam_fwd-{float_ty}", _reparam_kl._reparam_kl_fwd_kernel, float_ty,
             dict(VAR_EPS=1e-4, ACC=acc, **_reparam_kl.launch_config(Z))),
            (f"reparam_bwd-{float_ty}", _reparam_kl._reparam_kl_bwd_kernel, float_ty,
             dict(VAR_EPS=1e-4, NEED_DM=True, NEED_DR=True, NEED_DE=True, ACC=acc,
                  **_reparam_kl.launch_config(Z))),
            (f"segment_gather-{float_ty}", _sparse_linear._segment_gather_kernel, float_ty,
             dict(HAS_VAL=True, LOG1P=True, HAS_BIAS=True, HAS_COV=True, ACC=acc,
                  **_sparse_linear.launch_config(H))),
            (f"nb_fwd-{float_ty}", _nb_loglik._nb_fwd_kernel, float_ty,
             dict(EPS=1e-8, ACC=acc, **_nb_loglik.fwd_config(G))),
            (f"nb_bwd_dense-{float_ty}", _nb_loglik._nb_bwd_dense_kernel, float_ty,
             dict(EPS=1e-8, NEED_DZ=True, NEED_DR=True, ACC=acc, **_nb_loglik.bwd_dense_config(G))),
            (f"nb_bwd_sparse-{float_ty}", _nb_loglik._nb_bwd_sparse_kernel, float_ty,
             dict(EPS=1e-8, NEED_DZ=True, NEED_DR=True, ACC=acc, **_nb_loglik.bwd_sparse_config())),
        ]
    # the dW_cov variant: unweighted entries, no epilogue
    cases.append(("segment_gather-unweighted-fp32", _sparse_linear._segment_gather_kernel, "fp32",
                  dict(HAS_VAL=False, LOG1P=False, HAS_BIAS=False, HAS_COV=False,
                       ACC=tl.float32, **_sparse_linear.launch_config(H))))
    return cases


def _stack_bytes(cubin: bytes, tmp_path) -> int | None:
    """Per-thread stack (register spills) of a cubin, from cuobjdump; None without it."""
    import triton.backends.nvidia as nv

    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True)
    found = re.search(r"STACK:(\d+)", out.stdout)
    return int(found.group(1)) if found else None


def test_all_kernels_compile_for_sm90_without_spills(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    failures = []
    for name, kernel, float_ty, config in _cases():
        try:
            compiled = _compile(kernel, float_ty, config)
        except Exception as err:  # report every kernel that fails, not just the first
            failures.append(f"{name}: {type(err).__name__}: {str(err)[:2000]}")
            continue
        # the launch configurations are sized so that nothing spills to local memory
        stack = _stack_bytes(compiled.asm["cubin"], tmp_path)
        if stack:
            failures.append(f"{name}: {stack} bytes of stack per thread (register spills)")
    assert not failures, "\n\n".join(failures)
