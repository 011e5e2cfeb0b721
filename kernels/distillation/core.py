"""The distillation losses' row contract and what surrounds it: the backend choice, the mean's
normaliser, the forward pass over (M, V) logits and the fused head's chunk loop.

Each row's loss is a scalar function of the student's logits row, so (as for the
cross-entropy) its gradient row is computed in the forward pass with the row's factor folded in:
1 / the number of counted rows for "mean", 1 for "sum", or the upstream gradient of each row in
a second pass for "none". The formulas are in ``backends.torch_distill`` and
docs/DISTILLATION.md; the value checks of the tensors in ``value_checks``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from .. import backends
from ..backends import torch_distill
from ..backends.torch_ops import inverse_normaliser
from ..linear_chunks import HeadGrads, head_chunks
from ..options import accumulation_dtype
from .options import DistillOptions
from .teacher import Teacher, TeacherHead

# The Triton rows where Triton imports (the backends' own guard decides: "triton" is available
# only then).
if "triton" in backends.available_backends():
    from ..backends import triton_distill
else:  # pragma: no cover - depends on the platform
    triton_distill = None


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


def row_factor(grad_output: Tensor, like: Tensor) -> Tensor:
    """reduction="none": the upstream gradient (leading shape) as (M,) row factors in the
    accumulation dtype of ``like``, contiguous."""
    return grad_output.reshape(-1).to(accumulation_dtype(like.dtype)).contiguous()


def rows_backend(logits: Tensor) -> ModuleType:
    """The module whose ``run_rows`` computes the rows of these logits: ``triton_distill``
    where the Triton backend takes their device and dtype, else ``torch_distill`` (see
    ``backends.torch_distill.run_rows`` for the arguments). Looked up at each call."""
    if triton_distill is not None and backends.uses_triton(logits):
        return triton_distill
    return torch_distill


def reduce(loss_rows: Tensor, scale: Tensor, opts: DistillOptions) -> Tensor:
    """The (M,) row losses reduced as ``opts.reduction`` asks (``scale`` = 1 / count)."""
    if opts.per_row:
        return loss_rows
    total = loss_rows.sum()
    return total * scale.to(total.dtype) if opts.mean else total


def forward(
    logits: Tensor,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
    grad_now: bool,
    factor: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(reduced loss, (M, V) gradient or None) of (M, V) logits in one pass: the gradient of
    the reduced loss with ``grad_now``, or each row's gradient times ``factor`` (M,) when given
    (reduction "none", backward)."""
    M = logits.shape[0]
    scale = mean_scale(M, target, opts, logits)
    loss = torch.empty(M, dtype=accumulation_dtype(logits.dtype), device=logits.device)
    grad = None
    if grad_now or factor is not None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    factor = scale if factor is None else row_factor(factor, logits)
    rows_backend(logits).run_rows(logits, teacher, target, opts, loss, grad, factor)
    return reduce(loss, scale, opts), grad


def chunked(
    x: Tensor,
    head: tuple[Tensor, Tensor | None],
    dense: TeacherHead | None,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
    chunk_rows: int,
    scale: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One sweep over the token chunks of the fused head: the (N,) row losses and (optionally)
    the gradients; the (N, V) logits are never held whole.

    Args:
        x: (N, D) input rows, contiguous. head: W (V, D) and b (V,) or None.
        dense: the dense teacher head, or None (then ``teacher`` holds (N, k) ids and
            log-probabilities).
        teacher: the sparse teacher (its ``logits`` None).
        target: (N,) int64 class indices or None.
        opts: the distillation options.
        chunk_rows: token rows per chunk.
        scale: () (1 / the number of counted rows, or 1) or (N,) (one upstream factor per
            row); None: no gradients.
        needs: which of (grad_x, grad_W, grad_b) to compute (read only with ``scale``).

    Returns:
        loss rows (N,) (float32; float64 for float64 input), grad_x (N, D), grad_W (V, D),
        grad_b (V,), each None where not computed.
    """
    if torch.is_autocast_enabled(x.device.type):
        # The operands already have their dtypes; the chunk GEMMs must write into the buffers.
        with torch.autocast(x.device.type, enabled=False):
            args = (teacher, target, opts, chunk_rows, scale, needs)
            return chunked(x, head, dense, *args)
    W, b = head
    loss = torch.empty(x.shape[0], dtype=accumulation_dtype(x.dtype), device=x.device)
    want = scale is not None
    per_row = want and scale.dim() == 1
    grads = HeadGrads(x, W, b, needs if want else (False,) * 3)
    for rows, x_c, logits, t_c in teacher_chunks(x, head, dense, teacher, chunk_rows):
        # The gradient overwrites the logits in place, each row's factor folded in: one rounding.
        grad = logits if want else None
        factor = scale[rows] if per_row else scale
        t_rows = target[rows] if target is not None else None
        rows_backend(logits).run_rows(logits, t_c, t_rows, opts, loss[rows], grad, factor)
        if want:
            grads.add(rows, logits, x_c)
    return (loss, *grads.result())


def teacher_chunks(
    x: Tensor,
    head: tuple[Tensor, Tensor | None],
    dense: TeacherHead | None,
    teacher: Teacher,
    chunk_rows: int,
) -> Iterator[tuple[slice, Tensor, Tensor, Teacher]]:
    """(rows, x_c, logits, the teacher of those rows) of each chunk of the fused head
    (``linear_chunks.head_chunks``): a dense teacher's logits of the same rows are made in a
    second reused buffer, a sparse teacher's rows are views."""
    t_chunks = head_chunks(*dense, chunk_rows) if dense is not None else None
    for rows, x_c, logits in head_chunks(x, *head, chunk_rows):
        t_c = Teacher(next(t_chunks)[2]) if t_chunks is not None else teacher.rows(rows)
        yield rows, x_c, logits, t_c
