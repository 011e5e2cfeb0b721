"""The Triton backend: the launchers of the kernels of ``triton_jit.py``.

``run_rows`` launches the fused kernel (loss and gradient in one pass over the logits; see
``triton_jit.py`` for the maths and the layout) with its launch configuration
(``_launch_config``). ``mean_scale``, ``reduce_rows`` and ``scale_rows_`` are the backend's
side of the reductions around the rows: one-program kernels up to ``ONE_PROGRAM_ROWS`` rows,
torch's reductions (``torch_ops``) past it. ``backends`` imports this module where Triton is
installed; the jit kernels and tile helpers are importable from here too.
"""

from __future__ import annotations

import torch

from ..options import LossOptions
from ..stat_rows import COEF, CORRECT, ENTROPY, LOG_SUM, LOSS, MAX, Z_PART
from . import torch_ops
from .grid import cdiv, next_pow2
from .triton_jit import (  # noqa: F401 - re-exported: the kernels and tile helpers by this name
    _cross_entropy_kernel,
    _load_tile,
    _mean_scale_kernel,
    _multiply_rows_kernel,
    _reduce_kernel,
    _row_tile,
    _tanh,
    _target_coefs,
    _tile_argmax,
    _tile_gradient,
    _transform,
)

# Up to this many rows, one Triton program computes the mean scale (with the index check) and
# the final sum in a single launch each; past it, torch's multi-block reductions finish sooner
# than one program looping over all rows. A guess to be tuned on the GPU (docs/KERNEL_NOTES.md).
ONE_PROGRAM_ROWS = 16384


# Largest row tile kept in registers for the one-read path, by element size (bytes). On the GPU
# float32 rows up to 32768 classes stay in registers (16 warps: 64 values a thread): on an H200 at
# 8192 x 32000 that took the forward + gradient launch from 1.39x to 1.01x the time of a copy of
# the logits. Half-precision rows that long were slower in registers than in two sweeps there
# (1.78-1.99x vs 1.60-1.62x). The interpreter keeps the smaller tiles, so that the CPU suite
# runs both paths at the shapes it tests. Numbers ("Launch configurations"; H200, torch 2.11,
# triton 3.6): benchmarks/results/nvidia-h200-2026-11-26-check.md.
_SINGLE_TILE_MAX = {1: 16384, 2: 16384, 4: 32768}
_SINGLE_TILE_MAX_INTERPRETED = {1: 16384, 2: 16384, 4: 8192}


def _launch_config(M: int, V: int, elem_size: int, interpreted: bool) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_V, SINGLE_TILE, num_warps) from the shape."""
    v_pow2 = next_pow2(max(V, 1))
    single_max = (_SINGLE_TILE_MAX_INTERPRETED if interpreted else _SINGLE_TILE_MAX)[elem_size]
    if v_pow2 <= single_max:
        block_v = v_pow2
        # Several short rows per program so that each moves enough bytes to hide latency.
        target_elems = 1 << 14 if interpreted else 4096
        block_m = max(1, min(next_pow2(max(M, 1)), target_elems // block_v, 64))
        num_warps = 4 if block_m * block_v <= 4096 else 8
        if block_m * block_v >= 16384:
            num_warps = 16
        return block_m, block_v, True, num_warps
    if interpreted:
        return 1, 4096, False, 16
    # Two sweeps over the row. Half precision: 4096-column tiles and 8 warps measured fastest on
    # an H200 (50257 classes: 1.63 vs 1.93 ms for 8192 columns and 16 warps; no slower at 32000
    # and 128256); float32: 8192 and 16 warps were as fast as any other choice measured.
    return (1, 4096, False, 8) if elem_size <= 2 else (1, 8192, False, 16)


def run_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    stats: torch.Tensor,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    grad_only: bool = False,
    token_weight: torch.Tensor | None = None,
) -> None:
    """Launches the fused kernel: the row contract of ``core.run_rows``, arguments checked."""
    M, V = logits.shape
    if M == 0:
        return
    interpreted = not logits.is_cuda
    block_m, block_v, single, num_warps = _launch_config(M, V, logits.element_size(), interpreted)
    write_grad = grad is not None
    write_stats = stats.shape[0] > COEF + 1 and not grad_only
    dummy = stats  # any valid pointer for arguments a specialisation never reads
    softcap = opts.softcap
    _cross_entropy_kernel[(cdiv(M, block_m),)](
        logits,
        logits.stride(0),
        grad if write_grad else dummy,
        grad.stride(0) if write_grad else 0,
        target,
        target.stride(0),
        weight if weight is not None else dummy,
        stats[LOSS],
        stats[MAX],
        stats[LOG_SUM],
        stats[COEF],
        scale if write_grad else dummy,
        token_weight if token_weight is not None else dummy,
        stats[Z_PART] if write_stats else dummy,
        stats[ENTROPY] if write_stats else dummy,
        stats[CORRECT] if write_stats else dummy,
        M,
        V,
        opts.ignore_index,
        opts.label_smoothing,
        opts.logit_scale,
        softcap if softcap is not None else 1.0,
        opts.z_loss,
        HAS_WEIGHT=weight is not None,
        SOFT_TARGET=target.dim() == 2,
        HAS_SMOOTHING=opts.label_smoothing > 0.0,
        WRITE_LOSS=not grad_only,
        WRITE_GRAD=write_grad,
        PER_ROW_SCALE=write_grad and scale.dim() == 1,
        HAS_LOGIT_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_Z_LOSS=opts.z_loss > 0.0,
        HAS_TOKEN_WEIGHT=token_weight is not None,
        WRITE_STATS=write_stats,
        SINGLE_TILE=single,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def multiply_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """In place ``grad *= factor`` for a (M, V) gradient; factor is () or (M,); no host sync."""
    M, V = grad.shape
    if M == 0 or V == 0:
        return
    block = min(next_pow2(V), 8192 if grad.is_cuda else 4096)
    per_row = factor.dim() == 1
    _multiply_rows_kernel[(M,)](
        grad,
        grad.stride(0),
        factor,
        V,
        PER_ROW=per_row,
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )


def mean_scale_and_bad_count(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    num_rows: int,
    num_classes: int,
    mean: bool,
    check: bool,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient scale (() float32) and, if ``check``, the count of bad class indices (() int32).

    Args:
        target: (M,) class indices or (M, V) probabilities.
        weight: (V,) float32 class weights or None.
        ignore_index: ignored class index.
        num_rows: M.
        num_classes: V.
        mean: reduction == "mean" (else the scale is 1).
        check: count class indices outside [0, V) that are not ignore_index.
        token_weight: (M,) float32 token weights or None (the normaliser sums t_i * w_{y_i}).
    """
    scale = torch.empty((), dtype=torch.float32, device=target.device)
    soft = target.dim() == 2
    check = check and not soft
    bad = torch.empty((), dtype=torch.int32, device=target.device) if check else None
    _mean_scale_kernel[(1,)](
        target,
        target.stride(0) if target.dim() else 0,
        weight if weight is not None else scale,
        scale,
        bad if bad is not None else scale,
        token_weight if token_weight is not None else scale,
        num_rows,
        num_classes,
        ignore_index,
        HAS_WEIGHT=weight is not None,
        MEAN=mean,
        SOFT_TARGET=soft,
        CHECK=check,
        HAS_TOKEN_WEIGHT=token_weight is not None and mean,
        BLOCK=4096 if target.is_cuda else 1024,
        num_warps=8,
    )
    return scale, bad


def sum_rows(loss_rows: torch.Tensor, scale: torch.Tensor, mean: bool) -> torch.Tensor:
    """() float32: sum of the (M,) per-row losses, times ``scale`` when ``mean``."""
    out = torch.empty((), dtype=torch.float32, device=loss_rows.device)
    _reduce_kernel[(1,)](
        loss_rows,
        scale,
        out,
        loss_rows.numel(),
        MEAN=mean,
        BLOCK=4096 if loss_rows.is_cuda else 1024,
        num_warps=8,
    )
    return out


def rows_per_call(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    stats: torch.Tensor,
    grad_only: bool,
    token_weight: torch.Tensor | None,
) -> int:
    """Every row in one launch."""
    return logits.shape[0]


def mean_scale(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    check: bool,
    token_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch_ops.mean_scale``: one tiny launch computes both the scale and the bad-index count
    (up to ``ONE_PROGRAM_ROWS`` rows)."""
    M, V = logits.shape
    if M > ONE_PROGRAM_ROWS:
        return torch_ops.mean_scale(logits, target, weight, opts, check, token_weight)
    return mean_scale_and_bad_count(
        target, weight, opts.ignore_index, M, V, opts.mean, check, token_weight
    )


def reduce_rows(loss_rows: torch.Tensor, scale: torch.Tensor, mean: bool) -> torch.Tensor:
    """``torch_ops.reduce_rows``: one program sums float32 losses in a fixed order (up to
    ``ONE_PROGRAM_ROWS`` rows)."""
    if loss_rows.dtype == torch.float32 and loss_rows.numel() <= ONE_PROGRAM_ROWS:
        return sum_rows(loss_rows, scale, mean)
    return torch_ops.reduce_rows(loss_rows, scale, mean)


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` for a () factor, no host sync: a factor of exactly 1 moves no data."""
    multiply_rows_(grad, factor.float().contiguous())
