"""The ``torch.library`` custom ops of the distillation losses: what ``torch.compile`` sees.

``fusedce::distillation_loss`` (logits) and ``fusedce::linear_distillation_loss`` (the fused
head) return the loss with the gradients of the reduced loss computed in the same pass (scalar
reductions); their ``_grad`` ops run the rows again with each row's upstream factor
(``reduction="none"``). Each op has a fake of the real outputs' shapes and strides (every output
contiguous) and an autograd formula. The options travel as plain values
(``DistillOptions.as_args``), the teacher and target as optional tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import accumulation_dtype
from . import core
from .functions import check_backward
from .options import DistillOptions
from .teacher import Teacher, TeacherHead
from .value_checks import ValueCheck

_WHO = "distillation_loss"
_LINEAR_WHO = "linear_distillation_loss"

# The option arguments of the ops after their tensors (``DistillOptions`` in field order, then
# the fused head's chunking and which gradients it computes): how the fakes read them.
_OPTIONS = ("divergence", "beta", "temperature", "tail", "ignore_index", "hard_weight")
_HEAD = ("chunk_rows", "need_x", "need_w", "need_b")


def _named(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, object]:
    """The arguments ``names`` of a fake's positional ``args`` and ``kwargs``."""
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """``t`` with unit stride along the classes (a copy only where it lacks it)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _empty_or(t: Tensor | None, like: Tensor) -> Tensor:
    """``t``, or a new empty tensor (one per output: an op's outputs may not alias)."""
    return t if t is not None else like.new_empty((0,))


def _fake_head_grads(x, W, b, a: dict[str, object], per_row: bool) -> tuple[Tensor, ...]:
    """The fakes of (grad_x, grad_W, grad_b): full where asked (and not "none"), else empty."""
    keep = not per_row
    gx = x.new_empty(x.shape) if a["need_x"] and keep else None
    gw = W.new_empty(W.shape) if a["need_w"] and keep else None
    gb = b.new_empty(b.shape) if b is not None and a["need_b"] and keep else None
    return _empty_or(gx, x), _empty_or(gw, x), _empty_or(gb, x)


# --------------------------------------------------------------------------------------------
# distillation_loss
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedce::distillation_loss", mutates_args=())
def distillation_op(
    logits: Tensor,
    teacher_logits: Tensor | None,
    teacher_ids: Tensor | None,
    teacher_log_probs: Tensor | None,
    target: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    ignore_index: int,
    hard_weight: float,
    reduction: str,
    grad_now: bool,
    who: str = _WHO,
) -> tuple[Tensor, Tensor]:
    """(loss, gradient of the reduced loss or an empty tensor), both contiguous."""
    opts = DistillOptions(divergence, beta, temperature, tail, ignore_index, hard_weight, reduction)
    logits = _unit_stride(logits)
    teacher = Teacher(_unit_stride(teacher_logits), teacher_ids, teacher_log_probs)
    ValueCheck(who, logits.shape[1], teacher, target, ignore_index).run(defer=False)
    loss, grad = core.forward(logits, teacher, target, opts, grad_now)
    # "none" returns the row losses: a fresh tensor, never aliasing an input.
    return loss, _empty_or(grad, logits)


@distillation_op.register_fake
def _(logits, teacher_logits, teacher_ids, teacher_log_probs, target, *args, **kwargs):
    a = _named((*_OPTIONS, "reduction", "grad_now"), args, kwargs)
    acc = accumulation_dtype(logits.dtype)
    M = logits.shape[0]
    loss = logits.new_empty((M,) if a["reduction"] == "none" else (), dtype=acc)
    return loss, logits.new_empty(logits.shape if a["grad_now"] else (0,))


@torch.library.custom_op("fusedce::distillation_loss_grad", mutates_args=())
def _distillation_grad_op(
    logits: Tensor,
    teacher_logits: Tensor | None,
    teacher_ids: Tensor | None,
    teacher_log_probs: Tensor | None,
    target: Tensor | None,
    row_factor: Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    ignore_index: int,
    hard_weight: float,
) -> Tensor:
    """reduction="none": each row's gradient times its upstream factor, contiguous."""
    opts = DistillOptions(divergence, beta, temperature, tail, ignore_index, hard_weight, "none")
    teacher = Teacher(_unit_stride(teacher_logits), teacher_ids, teacher_log_probs)
    _, grad = core.forward(_unit_stride(logits), teacher, target, opts, False, row_factor)
    return grad


@_distillation_grad_op.register_fake
def _(logits, *_args, **_kwargs):
    return logits.new_empty(logits.shape)  # contiguous, as the real op's


def _setup_context(ctx, inputs, output):
    # inputs: the five tensors, the six options, reduction, grad_now, who.
    ctx.options, ctx.who = inputs[5:11], inputs[13]
    ctx.per_row = inputs[11] == "none"
    # "none" runs the rows again in backward; else the gradient of the reduced loss is kept.
    ctx.save_for_backward(*(inputs[:5] if ctx.per_row else output[1:]))


def _backward(ctx, grad_loss, _grad_of_grad):
    check_backward(ctx.who)
    if ctx.per_row:
        grad = _distillation_grad_op(*ctx.saved_tensors, grad_loss, *ctx.options)
    else:
        (g,) = ctx.saved_tensors
        grad = g * grad_loss.to(g.dtype)
    return (grad,) + (None,) * 13


distillation_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# linear_distillation_loss
# --------------------------------------------------------------------------------------------


def _op_head(x, W, b, teacher_x, teacher_w, teacher_b, needs) -> tuple:
    """The fused head's arguments of an op: x, (W, b) contiguous, the dense teacher head or
    None, and ``needs`` with no bias gradient where there is no bias."""
    dense = TeacherHead.of(teacher_x, teacher_w, teacher_b)
    if dense is not None:
        dense = dense.contiguous()
    need_x, need_w, need_b = needs
    return x.contiguous(), (W.contiguous(), b), dense, (need_x, need_w, need_b and b is not None)


@torch.library.custom_op("fusedce::linear_distillation_loss", mutates_args=())
def linear_distillation_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    teacher_x: Tensor | None,
    teacher_w: Tensor | None,
    teacher_b: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    ignore_index: int,
    hard_weight: float,
    reduction: str,
    chunk_rows: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    who: str = _LINEAR_WHO,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_W, grad_b): the gradients of the reduced loss for scalar reductions
    where asked, else empty tensors; every output contiguous."""
    opts = DistillOptions(divergence, beta, temperature, tail, ignore_index, hard_weight, reduction)
    heads = (x, W, b, teacher_x, teacher_w, teacher_b)
    x, head, dense, needs = _op_head(*heads, (need_x, need_w, need_b))
    teacher = Teacher(None, ids, log_probs)
    ValueCheck(who, W.shape[0], teacher, target, ignore_index).run(defer=False)
    scale = core.mean_scale(x.shape[0], target, opts, x)
    grads = not opts.per_row and any(needs)
    args = (teacher, target, opts, chunk_rows, scale if grads else None, needs)
    rows_loss, gx, gw, gb = core.chunked(x, head, dense, *args)
    loss = core.reduce(rows_loss, scale, opts)
    return loss, _empty_or(gx, x), _empty_or(gw, x), _empty_or(gb, x)


@linear_distillation_op.register_fake
def _(x, W, b, *args, **kwargs):
    a = _named(
        ("t_x", "t_w", "t_b", "ids", "lp", "y", *_OPTIONS, "reduction", *_HEAD), args, kwargs
    )
    per_row = a["reduction"] == "none"
    loss = x.new_empty((x.shape[0],) if per_row else (), dtype=accumulation_dtype(x.dtype))
    return (loss, *_fake_head_grads(x, W, b, a, per_row))


@torch.library.custom_op("fusedce::linear_distillation_loss_grad", mutates_args=())
def _linear_distillation_grad_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    teacher_x: Tensor | None,
    teacher_w: Tensor | None,
    teacher_b: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    row_factor: Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    ignore_index: int,
    hard_weight: float,
    chunk_rows: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none": the three gradients with each row's upstream factor (empty where not
    asked), contiguous."""
    opts = DistillOptions(divergence, beta, temperature, tail, ignore_index, hard_weight, "none")
    heads = (x, W, b, teacher_x, teacher_w, teacher_b)
    x, head, dense, needs = _op_head(*heads, (need_x, need_w, need_b))
    factor = core.row_factor(row_factor, x)
    args = (Teacher(None, ids, log_probs), target, opts, chunk_rows, factor, needs)
    _, gx, gw, gb = core.chunked(x, head, dense, *args)
    return _empty_or(gx, x), _empty_or(gw, x), _empty_or(gb, x)


@_linear_distillation_grad_op.register_fake
def _(x, W, b, *args, **kwargs):
    names = ("t_x", "t_w", "t_b", "ids", "lp", "y", "row_factor", *_OPTIONS, *_HEAD)
    return _fake_head_grads(x, W, b, _named(names, args, kwargs), False)


def _linear_setup_context(ctx, inputs, output):
    # inputs: the nine tensors, the six options, reduction, chunk_rows, the needs, who.
    ctx.options, ctx.rest, ctx.who = inputs[9:15], inputs[16:20], inputs[20]
    ctx.per_row = inputs[15] == "none"
    # "none" runs the chunk loop again in backward; else the three gradients are kept.
    ctx.save_for_backward(*(inputs[:9] if ctx.per_row else output[1:]))


def _linear_backward(ctx, grad_loss, *_grads_of_grads):
    check_backward(ctx.who)
    if ctx.per_row:
        args = (*ctx.saved_tensors, grad_loss, *ctx.options, *ctx.rest)
        gx, gw, gb = _linear_distillation_grad_op(*args)
    else:
        gx, gw, gb = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    _, need_x, need_w, need_b = ctx.rest
    return (
        gx if need_x else None,
        gw if need_w else None,
        gb if need_b and gb.numel() else None,
    ) + (None,) * 18


linear_distillation_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
