"""The public distillation losses: ``distillation_loss`` (a divergence between a teacher's
distribution and the student's softmax, per row of logits) and ``linear_distillation_loss``
(the same on the fused head ``input @ W.T + b``, one chunk of logits at a time).

A DTensor split over the vocabulary is first unwrapped (``fusedce.sharded.dtensor``): the same
call on this rank's local parts over the mesh's group. Each call checks its options
(``options``) and tensors (``checks``), flattens them to rows and routes: vocabulary-parallel
(``fusedce.sharded.distillation``, after the ranks' agreement), the custom ops while
``torch.compile`` traces (``custom_ops``), the eager autograd Functions (``functions``) with a
gradient, else the rows alone (``core``). The definitions are in
docs/DISTILLATION.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from .. import index_check
from ..linear_chunks import planned_chunk_rows
from ..options import check_chunk_size
from ..sharded import distillation as sharded
from ..sharded import dtensor
from . import core
from .checks import (
    check_head,
    check_logits_call,
    check_sparse_and_target,
    check_teacher_form,
    check_teacher_head,
    wants_group,
)
from .custom_ops import distillation_op, linear_distillation_op
from .functions import FusedDistillation, FusedLinearDistillation
from .options import check_distill_options
from .teacher import Teacher, TeacherHead
from .value_checks import ValueCheck

__all__ = ["distillation_loss", "linear_distillation_loss"]

_Checked = TypeVar("_Checked")

_OPTIONS = ("divergence", "beta", "temperature", "tail", "ignore_index", "hard_weight", "reduction")


def _options(*values: object) -> dict[str, object]:
    """The options of a call (in ``_OPTIONS`` order) by keyword, to repeat the call on a
    DTensor's local parts."""
    return dict(zip(_OPTIONS, values, strict=True))


def _checked(
    who: str,
    process_group: object,
    like: object,
    check: Callable[[bool], tuple[_Checked, int]],
) -> tuple[_Checked, tuple[int, int] | None]:
    """Runs ``check(sharded)``, which returns (the checked arguments, the number of classes
    this rank holds); returns (the checked arguments, None) for a plain call, or (the checked
    arguments, (v0, V)) after the ranks' agreement for a vocabulary-parallel one (this rank's
    first global class and the whole vocabulary).

    Vocabulary-parallel, a rank whose arguments are refused still joins the agreement (one
    all_gather), so that every rank raises instead of waiting for it.
    """
    sharded_call = wants_group(who, process_group)
    if not sharded_call:
        return check(False)[0], None
    device = like.device if isinstance(like, Tensor) else torch.device("cpu")
    try:
        checked, width = check(True)
    except (TypeError, ValueError, IndexError) as err:
        sharded.agree(who, 0, err, process_group, device)  # raises err on this rank
        raise
    return checked, sharded.agree(who, width, None, process_group, device)


def distillation_loss(
    logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_log_probs: Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "bin",
    target: Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    process_group: object = None,
) -> Tensor:
    """A divergence between the teacher's distribution P and the student's Q = softmax(z),
    z = logits / T, per row; fused (the gradient is computed in the same pass as the loss).

    Args:
        logits: (..., V) student logits; float32, float16, bfloat16 (float64 on the torch
            backend); any strides. The only differentiated input.
        teacher_logits: (..., V) dense teacher logits of the logits' dtype: P = softmax(t / T).
        teacher_ids: (..., k) int64 class ids of a sparse teacher, -1 as padding (k >= 1;
            each id at most once per row).
        teacher_log_probs: (..., k) floating, the teacher's log-probabilities at those ids,
            used as given (T does not apply); their mass may not exceed 1 beyond rounding.
        divergence: "forward_kl" (sum p log(p / q)), "reverse_kl" (sum q log(q / p)) or "jsd"
            (beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q).
        beta: the JSD's weight in [0, 1].
        temperature: T > 0. No T**2 factor is applied (multiply the loss by T**2 for
            Hinton's scaling).
        tail: sparse teachers: "bin" (one extra class holds every id outside S: p_tail =
            max(0, 1 - sum p_S), q_tail = 1 - sum_S q) or "renormalize" (p and q renormalised
            over S; a row with no id gives 0). Dense teachers use all V classes.
        target: optional (...) class indices; rows equal to ``ignore_index`` are not counted.
        ignore_index: see ``target``.
        hard_weight: a in [0, 1]: row loss = (1 - a) D + a CE, CE the cross-entropy of the
            logits at temperature 1 (needs ``target``).
        reduction: "mean" (over the counted rows; 0 when none), "sum" or "none" (the leading
            shape, 0 at rows not counted).
        process_group: a ``torch.distributed.ProcessGroup`` over which the class dimension is
            split: ``logits`` (and ``teacher_logits``) are then this rank's contiguous slice of
            the classes (rank order), ids and class indices global; every rank gets the loss
            of the whole vocabulary, O(N k) numbers exchanged, never the logits. Without it, a
            ``DTensor`` ``logits`` sharded on the class dimension (``Shard(-1)``) of a 1-D
            device mesh runs the same over the mesh's group (``teacher_logits`` then a DTensor
            sharded alike; the sparse teacher and ``target`` plain or replicated), the loss a
            replicated DTensor.

    Returns:
        float32 (float64 for float64 logits): a scalar, or the leading shape for "none".

    Raises:
        ValueError, TypeError: a bad option, shape, dtype or device; no teacher or two forms;
            a teacher tensor that requires grad; a sparse mass above 1 beyond rounding.
        IndexError: a teacher id outside [0, V) other than -1, an id twice in a row, or a
            class index outside [0, V) other than ``ignore_index`` (on CUDA with a gradient:
            raised from backward, as ``set_target_check`` describes). Messages start with
            ``distillation_loss``.
        RuntimeError: ``process_group`` while ``torch.distributed`` is not initialised.
        ValueError: a DTensor ``logits`` (or ``teacher_logits``) not sharded as ``Shard(-1)``.
    """
    who = "distillation_loss"
    if dtensor.is_dtensor(logits):
        # Split over the vocabulary: this rank's local parts over the mesh's group.
        teacher = {"teacher_logits": teacher_logits, "teacher_ids": teacher_ids}
        teacher.update(teacher_log_probs=teacher_log_probs, target=target)
        mesh, local = dtensor.distillation_parts(who, logits, teacher, process_group)
        opts = _options(divergence, beta, temperature, tail, ignore_index, hard_weight, reduction)
        loss = distillation_loss(**local, **opts, process_group=mesh.get_group())
        return dtensor.replicated(loss, mesh)

    def check(in_slices: bool) -> tuple[tuple, int]:
        opts = check_distill_options(
            who, divergence, beta, temperature, tail, ignore_index, hard_weight, reduction
        )
        teacher = Teacher(teacher_logits, teacher_ids, teacher_log_probs)
        x, teacher, y = check_logits_call(who, logits, teacher, target, opts, in_slices)
        return (opts, x, teacher, y), x.shape[1]

    (opts, x, teacher, target), agreed = _checked(who, process_group, logits, check)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if agreed is not None:
        loss = sharded.distillation_loss_sharded(
            who, x, teacher, target, opts, process_group, *agreed
        )
    elif torch.compiler.is_compiling():
        grad_now = need_grad and not opts.per_row
        args = (x, *teacher, target, *opts.as_args())
        loss, _ = distillation_op(*args, grad_now=grad_now, who=who)
    elif need_grad:
        loss = FusedDistillation.apply(x, *teacher, target, opts, who)
    else:
        with index_check.reporting_as(who):
            ValueCheck(who, x.shape[1], teacher, target, opts.ignore_index).run(defer=False)
        loss, _ = core.forward(x, teacher, target, opts, False)
    return loss.reshape(logits.shape[:-1]) if opts.per_row else loss


def linear_distillation_loss(
    input: Tensor,
    linear_weight: Tensor,
    *,
    linear_bias: Tensor | None = None,
    teacher_input: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_log_probs: Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "bin",
    target: Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    process_group: object = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``distillation_loss(input @ linear_weight.T + linear_bias, ...)`` on the fused head: the
    (N, V) logits are never held whole, only one chunk of rows at a time.

    Args:
        input: (..., D) the student's hidden states; float32, float16, bfloat16 or float64.
        linear_weight: (V, D) the student's head, of the input's dtype.
        linear_bias: optional (V,).
        teacher_input: (..., D_t) a dense teacher's hidden states (the input's leading shape),
            with ``teacher_weight`` (V, D_t) and optional ``teacher_bias`` (V,), all of one
            dtype; its logits are made chunk by chunk beside the student's, never whole.
        teacher_ids, teacher_log_probs: (..., k) a sparse teacher, as in ``distillation_loss``.
        divergence, beta, temperature, tail, target, ignore_index, hard_weight, reduction: as
            in ``distillation_loss``.
        process_group: a ``torch.distributed.ProcessGroup`` over which the classes are split:
            ``linear_weight`` / ``linear_bias`` (and ``teacher_weight`` / ``teacher_bias``)
            are this rank's contiguous slice of the classes (rank order), ``input`` whole; the
            input's gradient is all-reduced inside. Without it, a ``DTensor`` ``linear_weight``
            sharded by rows (``Shard(0)``) of a 1-D device mesh runs the same over the mesh's
            group (``linear_bias``, ``teacher_weight`` and ``teacher_bias`` sharded alike; the
            other tensors plain or replicated), the loss a replicated DTensor.
        chunk_size: token rows per chunk (>= 1), or None: as many as fit 256 MiB of logits on
            a GPU (32 MiB on the CPU).

    Returns:
        float32 (float64 for float64 input): a scalar, or the leading shape for "none".
        Gradients reach ``input``, ``linear_weight`` and ``linear_bias`` only.

    Raises:
        ValueError, TypeError, IndexError: as ``distillation_loss``, and for the heads' shapes,
            dtypes and devices, and a DTensor head not sharded as ``Shard(0)``; messages
            start with ``linear_distillation_loss``.
    """
    who = "linear_distillation_loss"
    if dtensor.is_dtensor(linear_weight):
        # Split over the vocabulary: this rank's local parts over the mesh's group.
        more = {"linear_bias": linear_bias, "target": target, "teacher_input": teacher_input}
        more.update(teacher_weight=teacher_weight, teacher_bias=teacher_bias)
        more.update(teacher_ids=teacher_ids, teacher_log_probs=teacher_log_probs)
        mesh, local = dtensor.linear_distillation_parts(
            who, input, linear_weight, more, process_group
        )
        opts = _options(divergence, beta, temperature, tail, ignore_index, hard_weight, reduction)
        group = mesh.get_group()
        loss = linear_distillation_loss(**local, **opts, process_group=group, chunk_size=chunk_size)
        return dtensor.replicated(loss, mesh)
    W, b = linear_weight, linear_bias

    def check(in_slices: bool) -> tuple[tuple, int]:
        opts = check_distill_options(
            who, divergence, beta, temperature, tail, ignore_index, hard_weight, reduction
        )
        check_chunk_size(who, chunk_size)
        check_head(who, (input, W, b), ("input", "linear_weight", "linear_bias"), in_slices)
        dense_given = teacher_input is not None or teacher_weight is not None
        check_teacher_form(
            who,
            teacher_input if dense_given else None,
            teacher_ids,
            teacher_log_probs,
            dense_name="teacher_input with teacher_weight",
        )
        V = W.shape[0]
        dense = None
        if dense_given:
            t_head = (teacher_input, teacher_weight, teacher_bias)
            t_rows = check_teacher_head(who, t_head, input, V, in_slices)
            dense = TeacherHead(t_rows, teacher_weight, teacher_bias)
        lead = tuple(input.shape[:-1])
        sparse = Teacher(None, teacher_ids, teacher_log_probs)
        teacher, y = check_sparse_and_target(who, lead, input.device, sparse, target, opts)
        x = input.reshape(-1, input.shape[-1]).contiguous()
        rows = planned_chunk_rows(x.shape[0], V, x.dtype, chunk_size, x.device)
        return (opts, x, dense, teacher, y, rows), V

    (opts, x, dense, teacher, target, rows), agreed = _checked(who, process_group, input, check)
    grad_enabled = torch.is_grad_enabled()
    wants = [grad_enabled and t is not None and t.requires_grad for t in (input, W, b)]
    # The tensors of the autograd Functions and the ops: the heads, the sparse teacher, target.
    tensors = (x, W, b, *(dense if dense is not None else (None,) * 3), *teacher[1:], target)
    if agreed is not None:
        loss = sharded.linear_distillation_loss_sharded(
            who, tensors, opts, rows, agreed, process_group
        )
    elif torch.compiler.is_compiling():
        loss, *_ = linear_distillation_op(*tensors, *opts.as_args(), rows, *wants, who)
    elif any(wants):
        loss = FusedLinearDistillation.apply(*tensors, opts, rows, who)
    else:
        ValueCheck(who, W.shape[0], teacher, target, opts.ignore_index).run(defer=False)
        args = (teacher, target, opts, rows, None, (False,) * 3)
        loss_rows, *_ = core.chunked(x, (W, b), dense, *args)
        loss = core.reduce(loss_rows, core.mean_scale(x.shape[0], target, opts, x), opts)
    return loss.reshape(input.shape[:-1]) if opts.per_row else loss
