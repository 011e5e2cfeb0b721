"""The harness of the sm_90 compile checks (``tests/test_*compile_hopper.py``): compile a Triton
kernel for a Hopper GPU here, without a GPU.

Triton's compiler (front end, MLIR passes, LLVM and the ptxas it ships) needs no device; this
catches what the interpreter cannot: type errors in loop-carried values, static-branch scoping,
layouts. CI runs the checks twice: with the installed triton, and with the GPU image's triton
3.6 (``make compile-check-gpu-image``). The test modules import it after
``pytest.importorskip("triton")``, so that they skip where triton is missing.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedce.backends import triton_kernels as tk

HOPPER = GPUTarget("cuda", 90, 32)

# The switches of the fused row kernel (``_cross_entropy_kernel``) besides its tile.
ROW_FLAGS = (
    "HAS_WEIGHT",
    "SOFT_TARGET",
    "HAS_SMOOTHING",
    "WRITE_LOSS",
    "WRITE_GRAD",
    "PER_ROW_SCALE",
    "HAS_LOGIT_SCALE",
    "HAS_SOFTCAP",
    "HAS_Z_LOSS",
    "HAS_TOKEN_WEIGHT",
    "WRITE_STATS",
)


def compile_for_hopper(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int):
    """Compiles the @triton.jit ``fn`` for sm_90 (``types``: the runtime arguments' Triton
    types; every other argument is a constexpr of ``constexprs``) and checks that PTX for sm_90
    came out; returns the compiled kernel."""
    names = fn.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    const = {(names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=const)
    kernel = triton.compile(src, target=HOPPER, options={"num_warps": num_warps})
    assert ".target sm_90" in kernel.asm["ptx"]
    return kernel


def compile_row_kernel(V: int, dtype: str = "bf16", **flags: bool) -> bool:
    """Compiles the fused row kernel as the launcher runs it on a GPU for rows of ``V`` classes
    of ``dtype`` ("bf16" or "fp32"): its tile (``_launch_config``), its pointers and scalars, and
    the switches of ``ROW_FLAGS`` (False where not given). Returns whether the row fits in one
    tile (``SINGLE_TILE``)."""
    elem_size = 2 if dtype == "bf16" else 4
    block_m, block_v, single, warps = tk._launch_config(64, V, elem_size, interpreted=False)
    types = {
        "logits_ptr": f"*{dtype}",
        "stride_logits": "i64",
        "grad_ptr": f"*{dtype}",
        "stride_grad": "i64",
        "target_ptr": "*fp32" if flags.get("SOFT_TARGET") else "*i64",
        "stride_target": "i64",
        "weight_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "max_ptr": "*fp32",
        "log_sum_ptr": "*fp32",
        "coef_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "token_weight_ptr": "*fp32",
        "z_part_ptr": "*fp32",
        "entropy_ptr": "*fp32",
        "correct_ptr": "*fp32",
        "M": "i32",
        "V": "i32",
        "ignore_index": "i32",
        "label_smoothing": "fp32",
        "logit_scale": "fp32",
        "softcap": "fp32",
        "z_loss": "fp32",
    }
    constexprs = dict.fromkeys(ROW_FLAGS, False) | flags
    constexprs.update(SINGLE_TILE=single, BLOCK_M=block_m, BLOCK_V=block_v)
    compile_for_hopper(tk._cross_entropy_kernel, types, constexprs, warps)
    return single


def compile_mean_scale(soft: bool, **constexprs: object):
    """Compiles the mean-scale prologue (``_mean_scale_kernel``) for class indices or
    probabilities; ``constexprs``: its switches (``HAS_TOKEN_WEIGHT`` False unless given)."""
    types = {
        "target_ptr": "*fp32" if soft else "*i64",
        "stride_target": "i64",
        "weight_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "bad_ptr": "*i32",
        "token_weight_ptr": "*fp32",
        "M": "i32",
        "V": "i32",
        "ignore_index": "i32",
    }
    switches = {"SOFT_TARGET": soft, "HAS_TOKEN_WEIGHT": False, "BLOCK": 4096} | constexprs
    return compile_for_hopper(tk._mean_scale_kernel, types, switches, 8)
