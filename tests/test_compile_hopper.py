"""Every kernel specialisation of the cross-entropy and of ``token_log_probs`` compiles for a
Hopper GPU (sm_90), here, without a GPU (the harness, and why: ``tests/hopper_compile.py``)."""

from __future__ import annotations

import itertools

import pytest

triton = pytest.importorskip("triton")
from hopper_compile import (  # noqa: E402
    compile_for_hopper,
    compile_mean_scale,
    compile_row_kernel,
)

from fusedce.backends import triton_kernels as tk  # noqa: E402
from fusedce.backends import triton_log_probs as tlp  # noqa: E402


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("soft", [False, True])
def test_fused_kernel_compiles_for_sm90(dtype, soft):
    # (write_loss, write_grad, per_row_scale): forward with or without the gradient, and the
    # gradient-only launch of reduction="none" (per-row factors).
    modes = [(True, False, False), (True, True, False), (False, True, True)]
    for has_weight, smoothing, single, (write_loss, write_grad, per_row) in itertools.product(
        [False, True], [False, True], [False, True], modes
    ):
        # The widest tile each path launches on the GPU: 16000 bf16 or 32000 fp32 classes in
        # registers, and LLM rows in two sweeps.
        V = (16000 if dtype == "bf16" else 32000) if single else 128256
        in_regs = compile_row_kernel(
            V,
            dtype,
            HAS_WEIGHT=has_weight,
            SOFT_TARGET=soft,
            HAS_SMOOTHING=smoothing,
            WRITE_LOSS=write_loss,
            WRITE_GRAD=write_grad,
            PER_ROW_SCALE=per_row,
        )
        assert in_regs == single


@pytest.mark.parametrize(
    ("mean", "soft", "check"), [(True, False, True), (False, False, True), (True, True, False)]
)
def test_helper_kernels_compile_for_sm90(mean, soft, check):
    compile_mean_scale(soft, HAS_WEIGHT=not soft, MEAN=mean, CHECK=check)
    compile_for_hopper(
        tk._reduce_kernel,
        {"loss_rows_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32"},
        dict(MEAN=mean, BLOCK=4096),
        8,
    )
    compile_for_hopper(
        tk._multiply_rows_kernel,
        {"grad_ptr": "*bf16", "stride_grad": "i64", "factor_ptr": "*fp32", "V": "i32"},
        dict(PER_ROW=not mean, BLOCK=8192),
        8,
    )


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
        compile_for_hopper(
            tlp._log_prob_grad_kernel,
            types,
            dict(HAS_G_LP=g_lp, HAS_G_H=g_h, HAS_SCALE=scale, BLOCK_V=block),
            warps,
        )


@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "two_sweeps"])
def test_row_kernel_specialisations_of_token_log_probs_compile_for_sm90(single):
    """The row kernel as ``token_log_probs`` launches it: forward with and without the entropy
    extra, and the gradient-only launch with per-row factors, each with and without a
    temperature (``logit_scale``); class indices, no weights, smoothing, softcap or z-loss."""
    V = 16000 if single else 128256
    # (write_loss, write_grad, per_row_scale, write_stats)
    launches = [(True, False, False, True), (True, False, False, False), (False, True, True, False)]
    for (write_loss, write_grad, per_row, stats), scaled in itertools.product(
        launches, [False, True]
    ):
        in_regs = compile_row_kernel(
            V,
            WRITE_LOSS=write_loss,
            WRITE_GRAD=write_grad,
            PER_ROW_SCALE=per_row,
            HAS_LOGIT_SCALE=scaled,
            WRITE_STATS=stats,
        )
        assert in_regs == single
