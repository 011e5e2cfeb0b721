"""The one-pass extras' kernel specialisations compile for a Hopper GPU (sm_90), without a GPU.

The interpreter runs the extras' code on the CPU; this catches what it cannot (loop-carried
types of the online entropy and argmax, static-branch scoping). Run it with the GPU image's
triton too: ``PYTHONPATH=.venv/triton-3.6.0 python -m pytest tests/test_extras_compile_hopper.py``.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from test_compile_hopper import compile_for_hopper  # noqa: E402

from fusedce.backends import triton_kernels as tk  # noqa: E402

# (write_loss, write_grad, per_row_scale, write_stats): training forward with the stats,
# validation forward (stats, no gradient), and the gradient-only launch of reduction="none".
MODES = [(True, True, False, True), (True, False, False, True), (False, True, True, False)]


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "two_sweeps"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_extras_kernel_compiles_for_sm90(soft, single, mode):
    write_loss, write_grad, per_row, write_stats = mode
    dtype = "bf16"
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
    kernel = compile_for_hopper(
        tk._cross_entropy_kernel,
        types,
        dict(
            HAS_WEIGHT=True,
            SOFT_TARGET=soft,
            HAS_SMOOTHING=True,
            WRITE_LOSS=write_loss,
            WRITE_GRAD=write_grad,
            PER_ROW_SCALE=per_row,
            HAS_LOGIT_SCALE=True,
            HAS_SOFTCAP=True,
            HAS_Z_LOSS=True,
            HAS_TOKEN_WEIGHT=True,
            WRITE_STATS=write_stats,
            SINGLE_TILE=single,
            BLOCK_M=block_m,
            BLOCK_V=block_v,
        ),
        warps,
    )
    assert ".target sm_90" in kernel.asm["ptx"]


@pytest.mark.parametrize("soft", [False, True])
def test_mean_scale_with_token_weights_compiles_for_sm90(soft):
    kernel = compile_for_hopper(
        tk._mean_scale_kernel,
        {
            "target_ptr": "*fp32" if soft else "*i64",
            "stride_target": "i64",
            "weight_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "bad_ptr": "*i32",
            "token_weight_ptr": "*fp32",
            "M": "i32",
            "V": "i32",
            "ignore_index": "i32",
        },
        dict(
            HAS_WEIGHT=not soft,
            MEAN=True,
            SOFT_TARGET=soft,
            CHECK=not soft,
            HAS_TOKEN_WEIGHT=True,
            BLOCK=4096,
        ),
        8,
    )
    assert ".target sm_90" in kernel.asm["ptx"]
