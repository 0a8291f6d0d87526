"""Every Triton kernel compiles for a real GPU (sm_90: H100 / H200), all the way to a cubin.

Triton compiles ahead of time without a device: this catches what the interpreter cannot
(lowering, libdevice calls, register allocation by ptxas). It needs the kernels decorated as
compiled functions, so it skips when the run itself is interpreted (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util

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


def _compile(kernel, float_ty: str, constexprs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in INT_POINTERS else f"*{float_ty}"
        else:
            signature[name] = "i32"
    src = ASTSource(kernel, signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 0
    return compiled


def _cases():
    import triton.language as tl

    from scvi_fast.kernels.triton import _math, _nb_loglik, _reparam_kl, _sparse_linear

    cases = []
    for float_ty, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
        cases += [
            (f"special-{float_ty}", _math._special_kernel, float_ty, dict(BLOCK=1024)),
            (f"reparam_fwd-{float_ty}", _reparam_kl._reparam_kl_fwd_kernel, float_ty,
             dict(VAR_EPS=1e-4, ACC=acc, BLOCK_B=32, BLOCK_Z=64)),
            (f"reparam_bwd-{float_ty}", _reparam_kl._reparam_kl_bwd_kernel, float_ty,
             dict(VAR_EPS=1e-4, NEED_DM=True, NEED_DR=True, NEED_DE=True, ACC=acc,
                  BLOCK_B=32, BLOCK_Z=64)),
            (f"segment_gather-{float_ty}", _sparse_linear._segment_gather_kernel, float_ty,
             dict(HAS_VAL=True, LOG1P=True, HAS_BIAS=True, HAS_COV=True, ACC=acc,
                  BLOCK_E=32, BLOCK_H=128)),
            (f"nb_fwd-{float_ty}", _nb_loglik._nb_fwd_kernel, float_ty,
             dict(EPS=1e-8, ACC=acc, BLOCK_G=1024, BLOCK_NZ=64)),
            (f"nb_bwd_dense-{float_ty}", _nb_loglik._nb_bwd_dense_kernel, float_ty,
             dict(EPS=1e-8, NEED_DZ=True, NEED_DR=True, ACC=acc, BLOCK_B=16, BLOCK_G=128)),
            (f"nb_bwd_sparse-{float_ty}", _nb_loglik._nb_bwd_sparse_kernel, float_ty,
             dict(EPS=1e-8, NEED_DZ=True, NEED_DR=True, ACC=acc, BLOCK_NZ=64)),
        ]
    # the dW_cov variant: unweighted entries, no epilogue
    cases.append(("segment_gather-unweighted-fp32", _sparse_linear._segment_gather_kernel, "fp32",
                  dict(HAS_VAL=False, LOG1P=False, HAS_BIAS=False, HAS_COV=False,
                       ACC=tl.float32, BLOCK_E=32, BLOCK_H=128)))
    return cases


def test_all_kernels_compile_for_sm90(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    failures = []
    for name, kernel, float_ty, constexprs in _cases():
        try:
            _compile(kernel, float_ty, constexprs)
        except Exception as err:  # report every kernel that fails, not just the first
            failures.append(f"{name}: {type(err).__name__}: {str(err)[:2000]}")
    assert not failures, "\n\n".join(failures)
