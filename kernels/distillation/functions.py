"""The eager autograd Functions of the distillation losses (what runs outside ``torch.compile``).

``FusedDistillation`` (logits) and ``FusedLinearDistillation`` (the fused head's chunk loop,
``core.chunked``): scalar reductions compute the gradients in forward and only scale them in
backward; ``reduction="none"`` runs the rows again in backward with each row's upstream factor
folded in (one rounding). Both take checked, flattened tensors and a ``DistillOptions``; the
public functions (``api``) apply them, and the custom ops (``custom_ops``) share their checks
of backward's calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import core as ce_core
from . import core
from .teacher import Teacher, TeacherHead
from .value_checks import ValueCheck


def check_backward(who: str, pending: object = None) -> None:
    """What backward checks first: no double backward (grad mode is on in backward only under
    ``create_graph=True``), then the deferred value check of forward, if any."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"fusedce.{who}: double backward (create_graph=True) is not supported")
    if pending is not None:
        pending.resolve()


def consumed_error(who: str) -> RuntimeError:
    """The error of a second backward through a graph whose fused gradient the first used."""
    return RuntimeError(
        f"fusedce.{who}: backward ran twice through the same graph "
        "(retain_graph=True); compute the loss again for a second backward"
    )


def scaled_(g: Tensor | None, factor: Tensor) -> Tensor | None:
    """``g *= factor`` in place, without a host sync on CUDA: a factor of exactly 1 moves no
    data (the weight's gradient is the size of the head); None stays None."""
    if g is None:
        return None
    ce_core.apply_upstream_grad_(g.reshape(1, -1) if g.dim() == 1 else g, factor)
    return g


class FusedDistillation(torch.autograd.Function):
    """Logits (M, V): scalar reductions compute the gradient in forward and scale it in
    backward; "none" runs the rows again in backward with each row's upstream factor."""

    @staticmethod
    def forward(ctx, logits, teacher_logits, ids, log_probs, target, opts, who):  # type: ignore[override]
        teacher = Teacher(teacher_logits, ids, log_probs)
        check = ValueCheck(who, logits.shape[1], teacher, target, opts.ignore_index)
        ctx.pending = check.run(defer=True)
        loss, grad = core.forward(logits, teacher, target, opts, not opts.per_row)
        # "none" runs the rows again in backward: the logits and the teacher are kept for it.
        ctx.save_for_backward(*((logits, *teacher, target) if opts.per_row else ()))
        ctx.opts, ctx.who, ctx.grad = opts, who, grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        check_backward(ctx.who, ctx.pending)
        if ctx.opts.per_row:
            logits, t_logits, ids, log_probs, target = ctx.saved_tensors
            teacher = Teacher(t_logits, ids, log_probs)
            _, grad = core.forward(logits, teacher, target, ctx.opts, False, grad_output)
        else:
            if ctx.grad is None:
                raise consumed_error(ctx.who)
            grad = scaled_(ctx.grad, grad_output)
        ctx.grad = None
        return grad, None, None, None, None, None, None


class FusedLinearDistillation(torch.autograd.Function):
    """The fused head: scalar reductions compute the three gradients in forward and scale them
    in backward; "none" runs the chunk loop again in backward with each row's upstream
    factor."""

    @staticmethod
    def forward(ctx, x, W, b, dense_x, dense_w, dense_b, ids, log_probs, target, opts, rows, who):  # type: ignore[override]
        dense = TeacherHead.of(dense_x, dense_w, dense_b)
        teacher = Teacher(None, ids, log_probs)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        ctx.pending = ValueCheck(who, W.shape[0], teacher, target, opts.ignore_index).run(True)
        args = (teacher, target, opts, rows)
        if opts.per_row:
            loss, *_ = core.chunked(x, (W, b), dense, *args, None, needs)
            ctx.save_for_backward(x, W, b, dense_x, dense_w, dense_b, ids, log_probs, target)
            ctx.grads = None
        else:
            scale = core.mean_scale(x.shape[0], target, opts, x)
            rows_loss, *grads = core.chunked(x, (W, b), dense, *args, scale, needs)
            loss = core.reduce(rows_loss, scale, opts)
            ctx.grads = grads
        ctx.opts, ctx.rows, ctx.needs, ctx.who = opts, rows, needs, who
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        check_backward(ctx.who, ctx.pending)
        if ctx.opts.per_row:
            x, W, b, dense_x, dense_w, dense_b, ids, log_probs, target = ctx.saved_tensors
            dense = TeacherHead.of(dense_x, dense_w, dense_b)
            factor = core.row_factor(grad_output, x)
            args = (Teacher(None, ids, log_probs), target, ctx.opts, ctx.rows, factor, ctx.needs)
            _, gx, gw, gb = core.chunked(x, (W, b), dense, *args)
        else:
            if ctx.grads is None:
                raise consumed_error(ctx.who)
            gx, gw, gb = (scaled_(g, grad_output) for g in ctx.grads)
            ctx.grads = None
        return (gx, gw, gb) + (None,) * 9
