"""The distillation losses' row contract and what surrounds it: the value checks of the
teacher's ids and probabilities (deferred on CUDA, as the class-index check), the backend
choice, the mean's normaliser and the forward pass.

Each row's loss is a scalar function of the student's logits row, so (as for the
cross-entropy) its gradient row is computed in the forward pass with the row's factor folded in:
1 / the number of counted rows for "mean", 1 for "sum", or the upstream gradient of each row in
a second pass for "none". The formulas are in ``backends.torch_distill`` and
docs/DISTILLATION.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends, index_check
from .backends import torch_distill
from .backends.torch_ops import inverse_normaliser
from .distill_options import DistillOptions
from .options import accumulation_dtype

# The Triton rows where Triton imports (the backends' own guard decides: "triton" is available
# only then).
if "triton" in backends.available_backends():
    from .backends import triton_distill
else:  # pragma: no cover - depends on the platform
    triton_distill = None


def mass_tolerance(dtype: torch.dtype, k: int) -> float:
    """How far above 1 the teacher's sparse mass sum_S exp(log p) may be from rounding alone.

    Each log-probability is rounded to ``dtype`` (relative error eps / 2 of |log p|), which
    moves p by p |log p| eps / 2; summed over S that is at most eps / 2 times the entropy of
    the k probabilities (<= log k). The float32 sum of k terms adds up to k float32 ulps.
    """
    eps = torch.finfo(dtype).eps
    return eps * max(1.0, math.log(max(k, 1))) + k * torch.finfo(torch.float32).eps


def _sparse_problems(ids: Tensor, log_probs: Tensor, V: int) -> tuple[Tensor, Tensor, Tensor]:
    """(M,) bool masks of the rows with an id outside [0, V) other than -1, with an id twice, and
    with a mass sum_S exp(log p) above 1 beyond rounding (NaN counts as above)."""
    out_of_range = ((ids < -1) | (ids >= V)).any(1)
    if ids.shape[1] > 1:
        s = ids.sort(1).values
        twice = ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any(1)
    else:
        twice = torch.zeros_like(out_of_range)
    acc = accumulation_dtype(log_probs.dtype)
    mass = torch.where(ids >= 0, log_probs.to(acc).exp(), 0.0).sum(1)
    too_much = ~(mass <= 1.0 + mass_tolerance(log_probs.dtype, ids.shape[1]))
    return out_of_range, twice, too_much


def count_bad(
    V: int,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    ignore_index: int,
) -> Tensor | None:
    """() int32 device count of the rows with a bad value (teacher ids, sparse mass, target
    class index), no host sync; None when there is nothing to check or the check is off."""
    if not index_check.target_check_enabled():
        return None
    counts = []
    if ids is not None and ids.numel():
        rows = torch.stack(_sparse_problems(ids, log_probs, V)).any(0)
        counts.append(rows.sum(dtype=torch.int32))
    if target is not None and target.numel():
        counts.append(index_check.count_bad_indices(target, V, ignore_index))
    if not counts:
        return None
    return counts[0] if len(counts) == 1 else counts[0] + counts[1]


def raise_bad(
    who: str,
    V: int,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    ignore_index: int,
    earlier: bool = False,
) -> None:
    """Raises the error of the first bad value: IndexError for an id or class index, ValueError
    for a sparse mass above 1 (reads the tensors on the host: only called once a count says
    something is wrong)."""
    later = " (in an earlier call, found when its count reached the host)" if earlier else ""
    if ids is not None and ids.numel():
        out_of_range, twice, too_much = _sparse_problems(ids, log_probs, V)
        if bool(out_of_range.any()):
            row = int(out_of_range.nonzero()[0, 0])
            bad = ids[row][(ids[row] < -1) | (ids[row] >= V)]
            raise IndexError(
                f"{who}: teacher_ids holds {int(bad[0])} in row {row}, out of bounds for {V} "
                f"classes (valid: 0..{V - 1}, or -1 for padding){later}"
            )
        if bool(twice.any()):
            row = int(twice.nonzero()[0, 0])
            raise IndexError(f"{who}: teacher_ids row {row} names a class twice{later}")
        if bool(too_much.any()):
            row = int(too_much.nonzero()[0, 0])
            acc = accumulation_dtype(log_probs.dtype)
            mass = float(torch.where(ids[row] >= 0, log_probs[row].to(acc).exp(), 0.0).sum())
            raise ValueError(
                f"{who}: the teacher's probabilities exp(teacher_log_probs) of row {row} sum to "
                f"{mass}, above 1 beyond rounding{later}"
            )
    if target is not None:
        index_check.raise_bad_index(target, V, ignore_index, earlier, who)


class DeferredDistillCheck(index_check.DeferredIndexCheck):
    """The bad-value count of a CUDA call on its way to the host (see ``DeferredIndexCheck``):
    read in backward if it has arrived, else by the next fusedce call or
    ``wait_target_check()``."""

    def __init__(self, n_bad: Tensor, who: str, V: int, ids, log_probs, target, ignore) -> None:
        super().__init__(n_bad, ids if ids is not None else target, V, ignore, who)
        self._what = (who, V, ids, log_probs, target, ignore)

    def resolve(self, wait: bool = False, earlier: bool = False) -> None:
        if self not in index_check._pending:
            return
        if not self._arrived.query():
            if not wait:
                return
            self._arrived.synchronize()
        index_check._pending.remove(self)
        if int(self._host):
            raise_bad(*self._what, earlier=earlier)


def check_values(
    who: str,
    V: int,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    ignore_index: int,
    defer: bool,
) -> DeferredDistillCheck | None:
    """Counts the bad values and raises now, or (``defer`` on CUDA) returns the check that
    backward resolves without a host sync."""
    if index_check._pending:
        index_check.raise_pending()  # counts of earlier calls that have arrived meanwhile
    n_bad = count_bad(V, ids, log_probs, target, ignore_index)
    if n_bad is None:
        return None
    if defer and n_bad.is_cuda:
        return DeferredDistillCheck(n_bad, who, V, ids, log_probs, target, ignore_index)
    if bool(n_bad):  # a host sync on CUDA (calls without a gradient)
        raise_bad(who, V, ids, log_probs, target, ignore_index)
    return None


def mean_scale(num_rows: int, target: Tensor | None, opts: DistillOptions, like: Tensor) -> Tensor:
    """() gradient scale in the accumulation dtype of ``like`` (the logits or the input): 1 /
    the number of counted rows for "mean" (0 when none), else 1; no host sync."""
    acc = accumulation_dtype(like.dtype)
    if not opts.mean:
        return torch.ones((), dtype=acc, device=like.device)
    if target is None:
        count = torch.full((), float(num_rows), dtype=acc, device=like.device)
    else:
        count = (target != opts.ignore_index).sum(dtype=acc)
    return inverse_normaliser(count)


def run_rows(
    logits: Tensor,
    teacher_logits: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    loss: Tensor,
    grad: Tensor | None = None,
    scale: Tensor | None = None,
) -> None:
    """The rows on the backend that takes tensors of this device and dtype (see
    ``backends.torch_distill.run_rows`` for the arguments)."""
    if triton_distill is not None and backends.uses_triton(logits):
        triton_distill.run_rows(
            logits, teacher_logits, ids, log_probs, target, opts, loss, grad, scale
        )
    else:
        torch_distill.run_rows(
            logits, teacher_logits, ids, log_probs, target, opts, loss, grad, scale
        )


def reduce(loss_rows: Tensor, scale: Tensor, opts: DistillOptions) -> Tensor:
    """The (M,) row losses reduced as ``opts.reduction`` asks (``scale`` = 1 / count)."""
    if opts.per_row:
        return loss_rows
    total = loss_rows.sum()
    return total * scale.to(total.dtype) if opts.mean else total


def forward(
    logits: Tensor,
    teacher_logits: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    grad_now: bool,
    row_factor: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(reduced loss, () scale, (M, V) gradient or None) of (M, V) logits in one pass: the
    gradient of the reduced loss with ``grad_now``, or each row's gradient times
    ``row_factor`` (M,) when given (reduction "none", backward)."""
    M = logits.shape[0]
    scale = mean_scale(M, target, opts, logits)
    loss = torch.empty(M, dtype=accumulation_dtype(logits.dtype), device=logits.device)
    grad = None
    if grad_now or row_factor is not None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    factor = scale
    if row_factor is not None:
        factor = row_factor.reshape(-1).to(loss.dtype).contiguous()
    run_rows(logits, teacher_logits, ids, log_probs, target, opts, loss, grad, factor)
    return reduce(loss, scale, opts), scale, grad
