"""The row contract every entry point is built on, and the reductions around it.

For logits viewed as (M, V) rows, a backend fills, per row i (see ``backends.triton_kernels``
for the formulas; w = class weights, eps = label smoothing, t = token weights, lambda = z-loss;
the loss sees z = softcap(logit_scale * x), m is the row max of z and
lse = m + log(sum exp(z - m))):

* ``stats[LOSS, i]`` -- the row's loss t_i * (l_i + lambda * lse_i**2) (NaN for an unchecked
  out-of-range index; the z-loss term only on non-ignored rows);
* ``stats[MAX, i]`` -- m_i, the row max of z (0 for a row with no finite logit);
* ``stats[LOG_SUM, i]`` -- log(sum_c exp(z_ic - m_i)), in [0, log V] for a finite row;
* ``stats[COEF, i]`` -- a_i, the coefficient of lse_i in l_i (0 for an ignored row);

and with ``EXTRA_STAT_ROWS`` rows (``return_stats``) also, in the same pass:

* ``stats[Z_PART, i]`` -- the z-loss part t_i * lambda * lse_i**2 (0 where ignored);
* ``stats[ENTROPY, i]`` -- the entropy of softmax(z_i);
* ``stats[CORRECT, i]`` -- 1.0 where argmax(z_i) (first maximum) is the class index (the argmax
  of the probability target), else 0.0 (0.0 where ignored).

Shift-exact arithmetic: every backend computes from the row max. The loss is
a * log_sum + w_y (1 - eps) (m - z_y) - sum_c b_c (z_c - m) and the gradient reads
exp((z - m) - log_sum): nothing adds the row max to a small number and subtracts it again, so a
common offset of the logits (1e8, 1e30) changes neither, as in torch's ``log_softmax``. lse itself
(m + log_sum) is only formed for the z-loss and for ``return_stats``.

When a gradient buffer is given, ``grad[i] = s_i * t_i * d (l_i + lambda lse_i**2) / d x_i`` with
s the gradient scale: one () factor for every row (1 / the mean normaliser, or 1) or one factor
per row; token weights multiply it row by row inside the backend. With ``grad_only`` the backend
reads lse and a back from ``stats`` and writes the gradient alone.

Around it: the mean normaliser (with the class-index check fused where the backend can), the
reduction of the per-row losses, and the scaling of a saved gradient by the upstream gradient,
each asked of the backend that runs tensors of that device and dtype (``backends.for_tensor``);
core itself never sees Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, index_check
from .backends.torch_ops import (  # noqa: F401 - re-exported: every entry point uses them
    inverse_normaliser,
    mean_normaliser,
    transformed_logits,
)
from .index_check import DeferredIndexCheck
from .options import LossOptions, accumulation_dtype
from .stat_rows import (  # noqa: F401 - re-exported: the rows are part of core's contract
    COEF,
    CORRECT,
    ENTROPY,
    EXTRA_STAT_ROWS,
    LOG_SUM,
    LOSS,
    MAX,
    STAT_ROWS,
    Z_PART,
    CrossEntropyStats,
    lse_of,
)


def new_stats(
    num_rows: int, dtype: torch.dtype, device: torch.device, extras: bool = False
) -> Tensor:
    """(4, M) uninitialised per-row statistics (loss, max, log-sum, lse coefficient), or (7, M)
    with the ``extras`` (z-loss part, entropy, correct), for logits of ``dtype``: float32,
    float64 for float64 logits."""
    rows = EXTRA_STAT_ROWS if extras else STAT_ROWS
    return torch.empty((rows, num_rows), dtype=accumulation_dtype(dtype), device=device)


def public_stats(stats: Tensor, scale: Tensor, opts: LossOptions, shape: tuple[int, ...]):
    """The user-facing ``CrossEntropyStats`` from (6, M) per-row statistics.

    Args:
        stats: (7, M) from a forward pass with the extras.
        scale: () 1 / the mean normaliser (read for reduction="mean").
        opts: the reduction is read.
        shape: the per-element shape (M elements).
    """
    stats = stats.detach()
    # torch ops only (M values, no pass over the logits): also traced by torch.compile.
    z_loss = stats[Z_PART].reshape(shape) if opts.per_row else stats[Z_PART].sum()
    if opts.mean:
        z_loss = z_loss * scale.to(z_loss.dtype)
    return CrossEntropyStats(
        z_loss.detach(),
        lse_of(stats).reshape(shape),
        stats[ENTROPY].reshape(shape),
        (stats[CORRECT] != 0).reshape(shape),
    )


def run_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    stats: Tensor,
    grad: Tensor | None = None,
    scale: Tensor | None = None,
    grad_only: bool = False,
    token_weight: Tensor | None = None,
) -> None:
    """Fills ``stats`` (and ``grad``) for a (M, V) view on the selected backend.

    Args:
        logits: (M, V) float tensor with unit stride along V.
        target: (M,) class indices (int32 / int64) or (M, V) probabilities, unit stride along V.
        weight: (V,) class weights in the accumulation dtype, or None.
        opts: everything but the reduction is read (the reduction is the caller's).
        stats: (4, M) or (7, M) per-row statistics: written, or read (max, log-sum and
            coefficient) with ``grad_only``.
        grad: (M, V) gradient output with unit stride along V (may be ``logits`` itself), or None.
        scale: () or (M,) float32 factors of the gradient rows; required with ``grad``.
        grad_only: write only the gradient, from the max, log-sum and coefficient in ``stats``.
        token_weight: (M,) contiguous token weights in the accumulation dtype, or None.
    """
    per_row = scale is not None and scale.dim() == 1
    backend = backends.select(logits, target, weight, grad, per_row, grad_only)
    M = logits.shape[0]
    rows = backend.rows_per_call(logits, target, weight, opts, stats, grad_only, token_weight)
    if rows >= M:
        backend.run_rows(logits, target, weight, opts, stats, grad, scale, grad_only, token_weight)
        return
    for r0 in range(0, M, rows):
        r = slice(r0, min(M, r0 + rows))
        backend.run_rows(
            logits[r],
            target[r],
            weight,
            opts,
            stats[:, r],
            grad[r] if grad is not None else None,
            scale[r] if per_row else scale,
            grad_only,
            token_weight[r] if token_weight is not None else None,
        )


def gradient_scale(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    defer_check: bool = False,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, DeferredIndexCheck | None]:
    """The () gradient scale (1 / mean normaliser, or 1), after the class-index check: float32
    (float64 for float64 logits on the torch backend).

    With ``defer_check`` (a gradient is wanted) a CUDA check is returned to be resolved in
    backward instead of reading the count back now.
    """
    V = logits.shape[1]
    check = index_check.target_check_enabled() and target.dim() == 1
    if index_check.has_pending():
        index_check.raise_pending()  # counts of earlier calls that have arrived meanwhile
    backend = backends.for_tensor(logits)
    scale, n_bad = backend.mean_scale(logits, target, weight, opts, check, token_weight)
    pending = index_check.settle(n_bad, target, V, opts.ignore_index, defer_check)
    return scale, pending


def reduce_rows(loss_rows: Tensor, scale: Tensor, opts: LossOptions) -> Tensor:
    """The per-row losses reduced as ``opts.reduction`` asks (``scale`` = 1 / normaliser)."""
    if opts.per_row:
        return loss_rows
    return backends.for_tensor(loss_rows).reduce_rows(loss_rows, scale, opts.mean)


def apply_upstream_grad_(grad: Tensor, factor: Tensor) -> None:
    """``grad *= factor`` in place for a (M, V) gradient; ``factor`` is () (no host sync on
    CUDA: a factor of exactly 1 moves no data)."""
    factor = factor.reshape(())
    backends.for_tensor(grad).scale_rows_(grad, factor)


class Forward(NamedTuple):
    """What a forward pass over (M, V) rows leaves behind."""

    loss: Tensor  # reduced as asked: () or (M,)
    stats: Tensor  # (4, M) or (7, M): see the module doc
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
    token_weight: Tensor | None = None,
    extras: bool = False,
) -> Forward:
    """Loss of a (M, V) view and, with ``grad_now``, the gradient of the reduced loss (in the
    logits' storage with ``inplace``), in one pass over the logits; with ``extras`` the stats
    hold the six rows of ``return_stats``. ``token_weight``: (M,) prepared token weights."""
    scale, pending = gradient_scale(logits, target, weight, opts, defer_check, token_weight)
    grad = None
    if grad_now:
        grad = (
            logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        )
    stats = new_stats(logits.shape[0], logits.dtype, logits.device, extras)
    run_rows(logits, target, weight, opts, stats, grad, scale, False, token_weight)
    return Forward(reduce_rows(stats[LOSS], scale, opts), stats, scale, grad, pending)


def gradient_from_stats(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    stats: Tensor,
    row_factor: Tensor,
    out: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> Tensor:
    """``row_factor[i] * d l_i / d logits[i]`` for every row, written once (one rounding),
    from the max, log-sum and coefficients of a forward pass.

    Args:
        logits, target, weight, opts: as in the forward pass.
        stats: (4, M) or (7, M) from the forward pass.
        row_factor: (M,) upstream gradient of each row's loss.
        out: (M, V) buffer (may be ``logits``); None allocates one.
        token_weight: (M,) prepared token weights, or None.
    """
    grad = (
        out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    )
    factor = row_factor.reshape(-1).to(accumulation_dtype(logits.dtype)).contiguous()
    run_rows(logits, target, weight, opts, stats, grad, factor, True, token_weight)
    return grad


def probability_target_grad(
    logits: Tensor,
    stats: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    row_factor: Tensor,
    token_weight: Tensor | None = None,
) -> Tensor:
    """d loss / d target for probability targets: -(1 - eps) t_i w_c log softmax(z)_c per row
    factor (z: the scaled, softcapped logits; the z-loss does not depend on the target), with
    log softmax(z) = (z - m) - log_sum from the row max (shift-exact).

    Args:
        logits: (M, V) logits of the forward pass (not overwritten since).
        stats: per-row statistics of the forward pass (the max and log-sum rows are read).
        weight: (V,) class weights or None.
        opts: label_smoothing, logit_scale and softcap are read.
        row_factor: () or (M,) factor of each row (upstream gradient times the mean scale).
        token_weight: (M,) prepared token weights, or None.

    Returns:
        (M, V) in the accumulation dtype.
    """
    acc = stats.dtype
    z, _ = transformed_logits(logits.to(acc), opts, need_derivative=False)
    g = (z - stats[MAX][:, None]).sub_(stats[LOG_SUM][:, None]).mul_(-(1.0 - opts.label_smoothing))
    if weight is not None:
        g.mul_(weight)
    f = row_factor.to(acc)
    if token_weight is not None:
        f = f * token_weight.to(acc)
    return g.mul_(f[:, None] if f.dim() == 1 else f)
