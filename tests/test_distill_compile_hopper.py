"""The distillation kernel compiles for a Hopper GPU (sm_90) here, without a GPU, in every
specialisation a call can launch (see tests/test_compile_hopper.py for why)."""

from __future__ import annotations

import itertools

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedce.backends import triton_distill as td  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def _compile(constexprs: dict[str, object], dtype: str, num_warps: int):
    fn = td._distill_kernel
    types = {
        "x_ptr": f"*{dtype}",
        "stride_x": "i64",
        "t_ptr": f"*{dtype}",
        "stride_t": "i64",
        "ids_ptr": "*i64",
        "lp_ptr": "*fp32",
        "target_ptr": "*i64",
        "loss_ptr": "*fp32",
        "grad_ptr": f"*{dtype}",
        "stride_g": "i64",
        "scale_ptr": "*fp32",
        "V": "i32",
        "K": "i32",
        "ignore_index": "i64",
        "inv_t": "fp32",
        "beta": "fp32",
        "hard": "fp32",
    }
    names = fn.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    const = {(names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=const)
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps})


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("div", [0, 1, 2])
def test_distill_kernel_compiles_for_sm90(div, dense):
    # The launch configuration of a 128256-class row with k = 256 (the GPU's tiles); every
    # switch that changes the code: tail, the two loss parts, target, gradient, per-row scale.
    block_v, block_k, warps = td.launch_config(128256, 256)
    tails = [True] if dense else [True, False]
    # (SOFT, HARD, HARD_STATS): the divergence alone; mixed with the cross-entropy at T = 1 and
    # at T != 1 (its own row statistics); the cross-entropy alone at T != 1.
    parts = [(True, False, False), (True, True, False), (True, True, True), (False, True, True)]
    grads = [(True, False), (True, True), (False, False)]
    for bin_, (soft, hard, hard_stats), (write, per_row) in itertools.product(tails, parts, grads):
        kernel = _compile(
            dict(
                DIV=div,
                DENSE=dense,
                BIN=bin_,
                SOFT=soft,
                HARD=hard,
                HARD_STATS=hard_stats,
                HAS_TARGET=hard or per_row,
                WRITE_GRAD=write,
                PER_ROW_SCALE=per_row,
                BLOCK_V=block_v,
                BLOCK_K=block_k,
            ),
            "bf16" if div != 1 else "fp32",
            warps,
        )
        assert ".target sm_90" in kernel.asm["ptx"]
