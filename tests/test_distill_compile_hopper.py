"""The distillation kernels (the rows, and the vocabulary slices' passes) compile for a Hopper
GPU (sm_90) here, without a GPU, in every specialisation a call can launch (the harness, and
why: tests/hopper_compile.py)."""

from __future__ import annotations

import itertools

import pytest

triton = pytest.importorskip("triton")
from hopper_compile import compile_for_hopper  # noqa: E402

from fusedce.backends import triton_distill as td  # noqa: E402
from fusedce.backends import triton_distill_slices as ts  # noqa: E402


def _compile(constexprs: dict[str, object], dtype: str, num_warps: int):
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
    return compile_for_hopper(td._distill_kernel, types, constexprs, num_warps)


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
        _compile(
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


def _compile_slices(kernel, types: dict[str, str], constexprs: dict[str, object], dtype: str):
    """One kernel of ``triton_distill_slices`` as its launcher runs it on a GPU: the slice of a
    128256-class vocabulary over 8 ranks (16032 columns, the GPU's tiles), k = 256."""
    block_v, block_k, warps = td.launch_config(128256 // 8, 256)
    rows = {"x_ptr": f"*{dtype}", "stride_x": "i64", "t_ptr": f"*{dtype}", "stride_t": "i64"}
    sizes = {"N": "i32", "V": "i32", "inv_t": "fp32"}
    switches = {"BLOCK_V": block_v}
    if "BLOCK_K" in kernel.arg_names:
        switches["BLOCK_K"] = block_k
    return compile_for_hopper(kernel, rows | sizes | types, switches | constexprs, warps)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_distill_slice_kernels_compile_for_sm90(dtype):
    # The statistics sweep: z alone, with the raw logits (T != 1), with a dense teacher, both.
    for raw, dense in itertools.product([False, True], repeat=2):
        _compile_slices(
            ts._slice_stats_kernel,
            {"out_ptr": "*fp32", "n_stats": "i32"},
            {"RAW": raw, "DENSE": dense},
            dtype,
        )
    # The dense teacher's sums of d and r, each divergence.
    for div in (0, 1, 2):
        _compile_slices(
            ts._slice_sums_kernel,
            {"glob_ptr": "*fp32", "out_ptr": "*fp32", "t_stat": "i32", "beta": "fp32"},
            {"DIV": div},
            dtype,
        )
    # The gradient: a dense teacher (each divergence), a sparse one (the divergence is in its
    # O(k) terms, not in the kernel), none (the cross-entropy alone); the cross-entropy part
    # absent, at T = 1 and at T != 1 (its own statistics).
    grad_types = {
        "glob_ptr": "*fp32",
        "row_ptr": "*fp32",
        "y_ptr": "*i64",
        "ids_ptr": "*i64",
        "at_ptr": "*fp32",
        "grad_ptr": f"*{dtype}",
        "stride_g": "i64",
        "K": "i32",
        "t_stat": "i32",
        "beta": "fp32",
        "hard": "fp32",
    }
    hards = [(False, False), (True, False), (True, True)]
    teachers = [(True, True, d) for d in (0, 1, 2)] + [(True, False, 0), (False, False, 0)]
    for (soft, dense, div), (hard, hard_stats) in itertools.product(teachers, hards):
        if not soft and not hard:
            continue
        _compile_slices(
            ts._slice_grad_kernel,
            grad_types,
            dict(DIV=div, SOFT=soft, DENSE=dense, HARD=hard, HARD_STATS=hard_stats),
            dtype,
        )
