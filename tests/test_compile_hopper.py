"""Every kernel specialisation compiles for a Hopper GPU (sm_90), here, without a GPU.

Triton's compiler (front end, MLIR passes, LLVM and the ptxas it ships) needs no device; this
catches what the interpreter cannot: type errors in loop-carried values, static-branch scoping,
layouts. CI runs it twice: with the installed triton, and with the GPU image's triton 3.6
(``make compile-check-gpu-image``).
"""

from __future__ import annotations

import itertools

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedce.backends import triton_kernels as tk  # noqa: E402
from fusedce.backends import triton_log_probs as tlp  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int):
    names = fn.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    const = {(names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=const)
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps})


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("soft", [False, True])
def test_fused_kernel_compiles_for_sm90(dtype, soft):
    types = {
        "logits_ptr": f"*{dtype}",
        "stride_logits": "i64",
        "grad_ptr": f"*{dtype}",
        "stride_grad": "i64",
        "target_ptr": "*fp32" if soft else "*i64",
        "stride_target": "i64",
        "weight_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "max_ptr": "*fp32",
        "log_sum_ptr": "*fp32",
        "coef_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "M": "i32",
        "V": "i32",
        "ignore_index": "i32",
        "label_smoothing": "fp32",
    }
    # (write_loss, write_grad, per_row_scale): forward with or without the gradient, and the
    # gradient-only launch of reduction="none" (per-row factors).
    modes = [(True, False, False), (True, True, False), (False, True, True)]
    for has_weight, smoothing, single, (write_loss, write_grad, per_row) in itertools.product(
        [False, True], [False, True], [False, True], modes
    ):
        # The widest tile each path launches on the GPU: 16000 bf16 or 32000 fp32 classes in
        # registers, and LLM rows in two sweeps.
        elem_size = 2 if dtype == "bf16" else 4
        V = (16000 if elem_size == 2 else 32000) if single else 128256
        block_m, block_v, in_regs, warps = tk._launch_config(64, V, elem_size, interpreted=False)
        assert in_regs == single
        kernel = compile_for_hopper(
            tk._cross_entropy_kernel,
            types,
            dict(
                HAS_WEIGHT=has_weight,
                SOFT_TARGET=soft,
                HAS_SMOOTHING=smoothing,
                WRITE_LOSS=write_loss,
                WRITE_GRAD=write_grad,
                PER_ROW_SCALE=per_row,
                SINGLE_TILE=single,
                BLOCK_M=block_m,
                BLOCK_V=block_v,
            ),
            warps,
        )
        assert "ptx" in kernel.asm and ".target sm_90" in kernel.asm["ptx"]


@pytest.mark.parametrize(
    ("mean", "soft", "check"), [(True, False, True), (False, False, True), (True, True, False)]
)
def test_helper_kernels_compile_for_sm90(mean, soft, check):
    prologue = compile_for_hopper(
        tk._mean_scale_kernel,
        {
            "target_ptr": "*fp32" if soft else "*i64",
            "stride_target": "i64",
            "weight_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "bad_ptr": "*i32",
            "M": "i32",
            "V": "i32",
            "ignore_index": "i32",
        },
        dict(HAS_WEIGHT=not soft, MEAN=mean, SOFT_TARGET=soft, CHECK=check, BLOCK=4096),
        8,
    )
    reduce = compile_for_hopper(
        tk._reduce_kernel,
        {"loss_rows_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32"},
        dict(MEAN=mean, BLOCK=4096),
        8,
    )
    scale = compile_for_hopper(
        tk._multiply_rows_kernel,
        {"grad_ptr": "*bf16", "stride_grad": "i64", "factor_ptr": "*fp32", "V": "i32"},
        dict(PER_ROW=not mean, BLOCK=8192),
        8,
    )
    for k in (prologue, reduce, scale):
        assert ".target sm_90" in k.asm["ptx"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_log_prob_grad_kernel_compiles_for_sm90(dtype):
    """``token_log_probs``' gradient pass: logp alone (a slice's rows), the entropy alone, both,
    with and without a temperature, at the GPU's tile width."""
    block, warps = tlp.block_v(128256, on_gpu=True)
    types = {
        "logits_ptr": f"*{dtype}",
        "stride_logits": "i64",
        "grad_ptr": f"*{dtype}",
        "stride_grad": "i64",
        "target_ptr": "*i64",
        "max_ptr": "*fp32",
        "log_sum_ptr": "*fp32",
        "entropy_ptr": "*fp32",
        "g_lp_ptr": "*fp32",
        "g_h_ptr": "*fp32",
        "V": "i32",
        "vocab": "i32",
        "col_offset": "i64",
        "ignore_index": "i64",
        "inv_temperature": "fp32",
    }
    for g_lp, g_h, scale in itertools.product([False, True], [False, True], [False, True]):
        if not (g_lp or g_h):
            continue  # never launched: no upstream gradient writes zeros
        kernel = compile_for_hopper(
            tlp._log_prob_grad_kernel,
            types,
            dict(HAS_G_LP=g_lp, HAS_G_H=g_h, HAS_SCALE=scale, BLOCK_V=block),
            warps,
        )
        assert ".target sm_90" in kernel.asm["ptx"]


@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "two_sweeps"])
def test_row_kernel_specialisations_of_token_log_probs_compile_for_sm90(single):
    """The row kernel as ``token_log_probs`` launches it: forward with and without the entropy
    extra, and the gradient-only launch with per-row factors, each with and without a
    temperature (``logit_scale``); class indices, no weights, smoothing, softcap or z-loss."""
    types = {
        "logits_ptr": "*bf16",
        "stride_logits": "i64",
        "grad_ptr": "*bf16",
        "stride_grad": "i64",
        "target_ptr": "*i64",
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
    V = 16000 if single else 128256
    block_m, block_v, in_regs, warps = tk._launch_config(64, V, 2, interpreted=False)
    assert in_regs == single
    # (write_loss, write_grad, per_row_scale, write_stats)
    launches = [(True, False, False, True), (True, False, False, False), (False, True, True, False)]
    for (write_loss, write_grad, per_row, stats), scaled in itertools.product(
        launches, [False, True]
    ):
        kernel = compile_for_hopper(
            tk._cross_entropy_kernel,
            types,
            dict(
                HAS_WEIGHT=False,
                SOFT_TARGET=False,
                HAS_SMOOTHING=False,
                WRITE_LOSS=write_loss,
                WRITE_GRAD=write_grad,
                PER_ROW_SCALE=per_row,
                HAS_LOGIT_SCALE=scaled,
                HAS_SOFTCAP=False,
                HAS_Z_LOSS=False,
                HAS_TOKEN_WEIGHT=False,
                WRITE_STATS=stats,
                SINGLE_TILE=single,
                BLOCK_M=block_m,
                BLOCK_V=block_v,
            ),
            warps,
        )
        assert ".target sm_90" in kernel.asm["ptx"]
