"""The row contract every entry point is built on, and the reductions around it.

For logits viewed as (M, V) rows, a backend fills, per row i (see ``triton_backend`` for the
formulas; w = class weights, eps = label smoothing):

* ``stats[0, i]`` -- the unnormalised loss l_i (NaN for an unchecked out-of-range index);
* ``stats[1, i]`` -- lse_i, the log-sum-exp of the row;
* ``stats[2, i]`` -- a_i, the coefficient of lse_i in l_i (0 for an ignored row);

and, when a gradient buffer is given, ``grad[i] = s_i * d l_i / d x_i`` with s the gradient
scale: one () factor for every row (1 / the mean normaliser, or 1) or one factor per row. With
``grad_only`` the backend reads lse and a back from ``stats`` and writes the gradient alone.

Around it: the mean normaliser (with the class-index check fused where the backend can), the
reduction of the per-row losses, and the scaling of a saved gradient by the upstream gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, index_check
from .index_check import DeferredIndexCheck
from .options import LossOptions, accumulation_dtype

try:
    from . import triton_backend
except ImportError:  # pragma: no cover - depends on the platform
    triton_backend = None

# Up to this many rows, one Triton program computes the mean scale (with the index check) and
# the final sum in a single launch each; past it, torch's multi-block reductions finish sooner
# than one program looping over all rows. A guess to be tuned on the GPU (docs/KERNEL_NOTES.md).
ONE_PROGRAM_ROWS = 16384


def new_stats(num_rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(3, M) uninitialised per-row statistics (loss, lse, lse coefficient) for logits of
    ``dtype``: float32, float64 for float64 logits."""
    return torch.empty((3, num_rows), dtype=accumulation_dtype(dtype), device=device)


def run_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    stats: Tensor,
    grad: Tensor | None = None,
    scale: Tensor | None = None,
    grad_only: bool = False,
) -> None:
    """Fills ``stats`` (and ``grad``) for a (M, V) view on the selected backend.

    Args:
        logits: (M, V) float tensor with unit stride along V.
        target: (M,) class indices (int32 / int64) or (M, V) probabilities, unit stride along V.
        weight: (V,) class weights in the accumulation dtype, or None.
        opts: ignore_index and label_smoothing are read (the reduction is the caller's).
        stats: (3, M) per-row statistics: written, or read with ``grad_only``.
        grad: (M, V) gradient output with unit stride along V (may be ``logits`` itself), or None.
        scale: () or (M,) float32 factors of the gradient rows; required with ``grad``.
        grad_only: write only the gradient, from the lse and coefficient in ``stats``.
    """
    per_row = scale is not None and scale.dim() == 1
    backend = backends.select(logits, target, weight, grad, per_row, grad_only)
    backend.run_rows(logits, target, weight, opts, stats, grad, scale, grad_only)


def inverse_normaliser(denom: Tensor) -> Tensor:
    """1 / denom, and 0 where denom is exactly 0: a mean over nothing (every target ignored, or
    no rows) gives 0, not NaN -- a documented deviation from torch. A negative normaliser
    (negative class weights) divides as torch does."""
    return torch.where(denom != 0, 1.0 / denom, 0.0)


def mean_normaliser(
    target: Tensor, weight: Tensor | None, ignore_index: int, acc: torch.dtype = torch.float32
) -> Tensor:
    """torch's normaliser of reduction="mean" as an ``acc`` device scalar (no host sync).

    Class indices: the sum of the weights of the non-ignored targets (their count without
    weights). Probabilities: the number of rows.
    """
    if target.dim() == 2:
        return torch.full((), float(target.shape[0]), dtype=acc, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=acc)
    # Clamp so that an unchecked bad index cannot gather out of bounds.
    idx = target.clamp(0, weight.numel() - 1).long()
    return torch.where(valid, weight[idx], 0.0).sum(dtype=acc)


def gradient_scale(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    defer_check: bool = False,
) -> tuple[Tensor, DeferredIndexCheck | None]:
    """The () gradient scale (1 / mean normaliser, or 1), after the class-index check: float32
    (float64 for float64 logits on the torch backend).

    With ``defer_check`` (a gradient is wanted) a CUDA check is returned to be resolved in
    backward instead of reading the count back now.
    """
    M, V = logits.shape
    check = index_check.target_check_enabled() and target.dim() == 1
    if index_check._pending:
        index_check.raise_pending()  # counts of earlier calls that have arrived meanwhile
    if backends.uses_triton(logits) and M <= ONE_PROGRAM_ROWS:
        # One tiny launch computes both the scale and the bad-index count.
        scale, n_bad = triton_backend.mean_scale_and_bad_count(
            target, weight, opts.ignore_index, M, V, opts.mean, check
        )
    else:
        n_bad = index_check.count_bad_indices(target, V, opts.ignore_index) if check else None
        if opts.mean:
            acc = accumulation_dtype(logits.dtype)
            scale = inverse_normaliser(mean_normaliser(target, weight, opts.ignore_index, acc))
        else:
            scale = torch.ones((), dtype=torch.float32, device=logits.device)
    pending = index_check.settle(n_bad, target, V, opts.ignore_index, defer_check)
    return scale, pending


def reduce_rows(loss_rows: Tensor, scale: Tensor, opts: LossOptions) -> Tensor:
    """The per-row losses reduced as ``opts.reduction`` asks (``scale`` = 1 / normaliser)."""
    if opts.per_row:
        return loss_rows
    if (
        loss_rows.dtype == torch.float32
        and backends.uses_triton(loss_rows)
        and loss_rows.numel() <= ONE_PROGRAM_ROWS
    ):
        return triton_backend.reduce_rows(loss_rows, scale, opts.mean)
    total = loss_rows.sum()
    return total * scale.to(total.dtype) if opts.mean else total


def apply_upstream_grad_(grad: Tensor, factor: Tensor) -> None:
    """``grad *= factor`` in place for a (M, V) gradient; ``factor`` is () (no host sync on
    CUDA: a factor of exactly 1 moves no data)."""
    factor = factor.reshape(())
    if backends.uses_triton(grad):
        triton_backend.multiply_rows_(grad, factor.float().contiguous())
    elif bool(factor != 1):  # CPU: reading the value costs nothing
        grad.mul_(factor.to(grad.dtype))


class Forward(NamedTuple):
    """What a forward pass over (M, V) rows leaves behind."""

    loss: Tensor  # reduced as asked: () or (M,)
    stats: Tensor  # (3, M): per-row loss, lse, lse coefficient
    scale: Tensor  # () float32: 1 / mean normaliser, or 1
    grad: Tensor | None  # (M, V) gradient of the reduced loss, or None
    pending_check: DeferredIndexCheck | None


def forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    grad_now: bool,
    inplace: bool = False,
    defer_check: bool = False,
) -> Forward:
    """Loss of a (M, V) view and, with ``grad_now``, the gradient of the reduced loss (in the
    logits' storage with ``inplace``), in one pass over the logits."""
    scale, pending = gradient_scale(logits, target, weight, opts, defer_check)
    grad = None
    if grad_now:
        grad = (
            logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        )
    stats = new_stats(logits.shape[0], logits.dtype, logits.device)
    run_rows(logits, target, weight, opts, stats, grad, scale)
    return Forward(reduce_rows(stats[0], scale, opts), stats, scale, grad, pending)


def gradient_from_stats(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    stats: Tensor,
    row_factor: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """``row_factor[i] * d l_i / d logits[i]`` for every row, written once (one rounding),
    from the lse and coefficients of a forward pass.

    Args:
        logits, target, weight, opts: as in the forward pass.
        stats: (3, M) from the forward pass.
        row_factor: (M,) upstream gradient of each row's loss.
        out: (M, V) buffer (may be ``logits``); None allocates one.
    """
    grad = (
        out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    )
    factor = row_factor.reshape(-1).to(accumulation_dtype(logits.dtype)).contiguous()
    run_rows(logits, target, weight, opts, stats, grad, factor, grad_only=True)
    return grad


def probability_target_grad(
    logits: Tensor, lse: Tensor, weight: Tensor | None, opts: LossOptions, row_factor: Tensor
) -> Tensor:
    """d loss / d target for probability targets: -(1 - eps) w_c (x_c - lse) per row factor.

    Args:
        logits: (M, V) logits of the forward pass (not overwritten since).
        lse: (M,) their log-sum-exp.
        weight: (V,) class weights or None.
        opts: label_smoothing is read.
        row_factor: () or (M,) factor of each row (upstream gradient times the mean scale).

    Returns:
        (M, V) in the accumulation dtype.
    """
    acc = lse.dtype
    g = (logits.to(acc) - lse[:, None]).mul_(-(1.0 - opts.label_smoothing))
    if weight is not None:
        g.mul_(weight)
    f = row_factor.to(acc)
    return g.mul_(f[:, None] if f.dim() == 1 else f)
