"""The one-pass extras' kernel specialisations compile for a Hopper GPU (sm_90), without a GPU.

The interpreter runs the extras' code on the CPU; this catches what it cannot (loop-carried
types of the online entropy and argmax, static-branch scoping). Run it with the GPU image's
triton too (``make compile-check-gpu-image``; the harness: ``tests/hopper_compile.py``).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from hopper_compile import compile_mean_scale, compile_row_kernel  # noqa: E402

# (write_loss, write_grad, per_row_scale, write_stats): training forward with the stats,
# validation forward (stats, no gradient), and the gradient-only launch of reduction="none".
MODES = [(True, True, False, True), (True, False, False, True), (False, True, True, False)]


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "two_sweeps"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_extras_kernel_compiles_for_sm90(soft, single, mode):
    write_loss, write_grad, per_row, write_stats = mode
    every_option = dict.fromkeys(
        ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_LOGIT_SCALE", "HAS_SOFTCAP", "HAS_Z_LOSS"), True
    )
    in_regs = compile_row_kernel(
        16000 if single else 128256,
        SOFT_TARGET=soft,
        WRITE_LOSS=write_loss,
        WRITE_GRAD=write_grad,
        PER_ROW_SCALE=per_row,
        HAS_TOKEN_WEIGHT=True,
        WRITE_STATS=write_stats,
        **every_option,
    )
    assert in_regs == single


@pytest.mark.parametrize("soft", [False, True])
def test_mean_scale_with_token_weights_compiles_for_sm90(soft):
    compile_mean_scale(soft, HAS_WEIGHT=not soft, MEAN=True, CHECK=not soft, HAS_TOKEN_WEIGHT=True)
