"""Every Triton kernel compiles for a real GPU (sm_90: H100 / H200), all the way to a cubin.

Triton compiles ahead of time without a device: this catches what the interpreter cannot
(lowering, libdevice calls, 16-bit atomics, register allocation by ptxas). Every launch
configuration a launcher can pick (the default and each candidate of
``scvi_fast.kernels.triton._configs``) is compiled, with the pointer types the launchers pass
(float32, float64, and bfloat16 logits / gradients / dense buffers where the op takes them;
int32 and int64 CSR indices), and must not spill registers to local memory. It needs the
kernels decorated as compiled functions, so it skips when the run itself is interpreted
(``TRITON_INTERPRET=1``).
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

INT_POINTERS = {"indptr_ptr", "indices_ptr", "seg_ptr", "idx_ptr", "cov_ptr", "gnz_ptr"}
G, H, Z = 8000, 512, 50  # the Census shape


def _compile(kernel, float_ty: str, config: dict, pointers: dict | None = None):
    """Compile ``kernel`` for sm_90: float pointers of ``float_ty``, integer pointers int64,
    except where ``pointers`` names another type; ``config`` holds the constexpr arguments and
    ``num_warps``, as the launchers pass them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = pointers or {}
    constexprs = {k: v for k, v in config.items() if k != "num_warps"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in INT_POINTERS else f"*{float_ty}"
        else:
            signature[name] = "i32"
    src = ASTSource(kernel, signature, constexprs=constexprs)
    options = {"num_warps": config.get("num_warps", 4)}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert len(compiled.asm["cubin"]) > 0
    return compiled


def _acc(float_ty):
    import triton.language as tl

    return tl.float64 if float_ty == "fp64" else tl.float32


def _torch_dtype(float_ty):
    import torch

    return {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[float_ty]


def _small_op_cases():
    from scvi_fast.kernels.triton import _math, _reparam_kl

    cases = []
    for ty in ("fp32", "fp64"):
        cfg = _reparam_kl.launch_config(Z)
        cases += [
            (f"special-{ty}", _math._special_kernel, ty, dict(BLOCK=256), None),
            (f"reparam_fwd-{ty}", _reparam_kl._reparam_kl_fwd_kernel, ty,
             dict(VAR_EPS=1e-4, ACC=_acc(ty), **cfg), None),
            (f"reparam_bwd-{ty}", _reparam_kl._reparam_kl_bwd_kernel, ty,
             dict(VAR_EPS=1e-4, NEED_DM=True, NEED_DR=True, NEED_DE=True, ACC=_acc(ty), **cfg),
             None),
        ]
    return cases


def _sparse_linear_cases():
    from scvi_fast.kernels.triton import _sparse_linear as sl

    cases = []
    for ty in ("fp32", "fp64"):
        for i, cfg in enumerate(sl.gather_candidates(H, _torch_dtype(ty))):
            cases.append((f"segment_gather-{ty}-{i}", sl._segment_gather_kernel, ty,
                          dict(HAS_VAL=True, LOG1P=True, HAS_BIAS=True, HAS_COV=True,
                               ACC=_acc(ty), **cfg), None))
    # dW_cov: unweighted entries, no epilogue; under bf16 autocast dy (src) is bf16
    for src in ("fp32", "bf16"):
        cases.append((f"segment_gather-unweighted-{src}", sl._segment_gather_kernel, "fp32",
                      dict(HAS_VAL=False, LOG1P=False, HAS_BIAS=False, HAS_COV=False,
                           ACC=_acc("fp32"), **sl.gather_candidates(H, _torch_dtype("fp32"))[0]),
                      {"src_ptr": src}))
    # densify: a float32, bfloat16 (autocast) or float64 buffer from float32 counts
    for out in ("fp32", "bf16", "fp64"):
        for i, cfg in enumerate(sl.densify_candidates()):
            idx = "i32" if i % 2 else "i64"
            cases.append((f"densify-{out}-{i}-{idx}", sl._densify_kernel, "fp32",
                          dict(LOG1P=True, ACC=_acc(out), **cfg),
                          {"out_ptr": out, "indices_ptr": idx, "indptr_ptr": idx}))
    return cases


def _nb_cases(part):
    from scvi_fast.kernels.triton import _nb_bwd as nbb
    from scvi_fast.kernels.triton import _nb_fwd as nbf

    fwd, bwd = [], []
    # logits (and their gradient) in float32, bfloat16 or float64; every other float float32
    # (float64 with float64 logits)
    for zt in ("fp32", "bf16", "fp64"):
        ty = "fp64" if zt == "fp64" else "fp32"
        dt = _torch_dtype(zt)
        zp = {"logits_ptr": zt}
        for i, cfg in enumerate(nbf.fwd_candidates(G, dt)):
            idx = "i32" if i % 2 else "i64"
            nc = -(-G // cfg["CHUNK"])
            split = nc > 1
            nc_block = max(2, 1 << (nc - 1).bit_length())
            fwd.append((f"nb_fwd-{zt}-{i}", nbf._nb_fwd_kernel, ty,
                          dict(EPS=1e-8, ACC=_acc(ty), SPLIT=split, NC_BLOCK=nc_block, **cfg),
                          dict(zp, indices_ptr=idx, indptr_ptr=idx)))
            if split:
                fwd.append((f"nb_fwd_chunk_max-{zt}-{i}", nbf._nb_fwd_chunk_max_kernel, ty,
                              dict(ACC=_acc(ty), CHUNK=cfg["CHUNK"], num_warps=cfg["num_warps"]),
                              zp))
                fwd.append((f"nb_fwd_combine-{zt}-{i}", nbf._nb_fwd_combine_kernel, ty,
                              dict(NC_BLOCK=nc_block, **nbf.COMBINE_CONFIG), None))
        for i, cfg in enumerate(nbb.bwd_dense_candidates(G, dt)):
            bwd.append((f"nb_bwd_dense-{zt}-{i}", nbb._nb_bwd_dense_kernel, ty,
                          dict(EPS=1e-8, NEED_DZ=True, NEED_DR=True, ZERO_ACC=True, ACC=_acc(ty),
                               **cfg), dict(zp, dz_ptr=zt)))
        for i, cfg in enumerate(nbb.bwd_sparse_candidates(dt)):
            for atomic in (True, False):
                bwd.append((f"nb_bwd_sparse-{zt}-{i}-atomic{int(atomic)}",
                              nbb._nb_bwd_sparse_kernel, ty,
                              dict(EPS=1e-8, NEED_DZ=True, NEED_DL=True, NEED_DR=True,
                                   ATOMIC=atomic, ACC=_acc(ty), **cfg), dict(zp, dz_ptr=zt)))
        bwd.append((f"nb_bwd_px_r-{zt}", nbb._nb_bwd_px_r_kernel, ty,
                    dict(ACC=_acc(ty), **nbb.PX_R_CONFIG), None))
    return fwd if part == "fwd" else bwd


# (logits dtype, zero-inflated, (B, G) px_r): every combination in float32; bfloat16 and
# float64 differ from it only in pointer types and register use, so fewer of them
_LIKELIHOOD_VARIANTS = [("fp32", zi, rows) for zi in (True, False) for rows in (False, True)]
_LIKELIHOOD_VARIANTS += [("bf16", True, False), ("bf16", True, True), ("fp64", True, False),
                         ("fp64", True, True), ("fp64", False, True)]


def _likelihood_cases(part):
    """ZINB (and NB with a (B, G) dispersion: ZI off) and Poisson kernels, every candidate."""
    from scvi_fast.kernels.triton import _poisson_loglik as pois
    from scvi_fast.kernels.triton import _zinb_bwd as zb
    from scvi_fast.kernels.triton import _zinb_fwd as zf

    cases = []
    for zt, zi, rows in _LIKELIHOOD_VARIANTS if part != "poisson" else ():
        ty = "fp64" if zt == "fp64" else "fp32"
        dt = _torch_dtype(zt)
        zp = {"logits_ptr": zt}
        tag = f"{zt}-zi{int(zi)}-rows{int(rows)}"
        flags = dict(EPS=1e-8, ZI=zi, PX_ROWS=rows, ACC=_acc(ty))
        need = dict(NEED_DZ=True, NEED_DPI=zi, NEED_DR=True)
        if part == "zinb_fwd":
            for i, cfg in enumerate(zf.fwd_candidates(G, dt)):
                idx = "i32" if i % 2 else "i64"
                cases.append((f"zinb_fwd-{tag}-{i}", zf._zinb_fwd_kernel, ty,
                              dict(flags, **cfg), dict(zp, indices_ptr=idx, indptr_ptr=idx)))
            continue
        if part == "zinb_bwd_dense":
            for i, cfg in enumerate(zb.bwd_dense_candidates(dt)):
                cases.append((f"zinb_bwd_dense-{tag}-{i}", zb._zinb_bwd_dense_kernel, ty,
                              dict(flags, **need, **cfg), dict(zp, dz_ptr=zt)))
            continue
        for i, cfg in enumerate(zb.bwd_sparse_candidates(dt)):
            cases.append((f"zinb_bwd_sparse-{tag}-{i}", zb._zinb_bwd_sparse_kernel, ty,
                          dict(flags, **need, NEED_DL=True, **cfg), dict(zp, dz_ptr=zt)))
    for zt in ("fp32", "bf16", "fp64") if part == "poisson" else ():
        ty = "fp64" if zt == "fp64" else "fp32"
        zp = {"logits_ptr": zt}
        for i, cfg in enumerate(pois.fwd_candidates(G, _torch_dtype(zt))):
            cases.append((f"poisson_fwd-{zt}-{i}", pois._poisson_fwd_kernel, ty,
                          dict(ACC=_acc(ty), **cfg), zp))
        cases.append((f"poisson_bwd_dense-{zt}", pois._poisson_bwd_dense_kernel, ty,
                      dict(ACC=_acc(ty), **pois.BWD_DENSE_CONFIG), dict(zp, dz_ptr=zt)))
        cases.append((f"poisson_bwd_sparse-{zt}", pois._poisson_bwd_sparse_kernel, ty,
                      dict(NEED_DZ=True, NEED_DL=True, ACC=_acc(ty), **pois.BWD_SPARSE_CONFIG),
                      dict(zp, dz_ptr=zt)))
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


@pytest.mark.parametrize("group", ["small_ops", "sparse_linear", "nb_fwd", "nb_bwd", "zinb_fwd",
                                   "zinb_bwd_dense", "zinb_bwd_sparse", "poisson"])
def test_all_kernels_compile_for_sm90_without_spills(group, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    cases = {"small_ops": _small_op_cases, "sparse_linear": _sparse_linear_cases,
             "nb_fwd": lambda: _nb_cases("fwd"), "nb_bwd": lambda: _nb_cases("bwd"),
             "zinb_fwd": lambda: _likelihood_cases("zinb_fwd"),
             "zinb_bwd_dense": lambda: _likelihood_cases("zinb_bwd_dense"),
             "zinb_bwd_sparse": lambda: _likelihood_cases("zinb_bwd_sparse"),
             "poisson": lambda: _likelihood_cases("poisson")}[group]()
    failures = []
    for name, kernel, float_ty, config, pointers in cases:
        try:
            compiled = _compile(kernel, float_ty, config, pointers)
        except Exception as err:  # report every kernel that fails, not just the first
            failures.append(f"{name}: {type(err).__name__}: {str(err)[:2000]}")
            continue
        # the launch configurations are sized so that nothing spills to local memory
        stack = _stack_bytes(compiled.asm["cubin"], tmp_path)
        if stack:
            failures.append(f"{name}: {stack} bytes of stack per thread (register spills)")
    assert not failures, "\n\n".join(failures)
