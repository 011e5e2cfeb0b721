"""``distillation_loss``: a divergence between a teacher's distribution and the student's
softmax, per row of logits, fused (loss and gradient in one pass over the logits).

This file holds the argument checks, the eager autograd Function and the ``torch.library``
custom ops that ``torch.compile`` sees; the rows are ``distill_core`` on a backend
(``backends.torch_distill`` or ``backends.triton_distill``). The definitions are in
docs/DISTILLATION.md.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import core, distill_core, distill_sharded, index_check
from .distill_options import DistillOptions, check_distill_options
from .options import INDEX_DTYPES, accumulation_dtype

__all__ = ["distillation_loss"]

_WHO = "distillation_loss"


class Teacher:
    """The teacher's tensors of one call, flattened to rows: ``logits`` (M, V) dense, or
    ``ids`` (M, k) int64 with ``log_probs`` (M, k) sparse (the other form None)."""

    __slots__ = ("ids", "log_probs", "logits")

    def __init__(self, logits: Tensor | None, ids: Tensor | None, log_probs: Tensor | None):
        self.logits, self.ids, self.log_probs = logits, ids, log_probs


def _refuse_grad(who: str, name: str, t: Tensor | None) -> None:
    if t is not None and t.requires_grad:
        raise ValueError(
            f"{who}: {name} requires grad; the teacher is not differentiated (gradients reach "
            f"the student only): pass {name}.detach()"
        )


def check_teacher_form(
    who: str,
    dense: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    dense_name: str = "teacher_logits",
) -> None:
    """Exactly one teacher form: ``dense_name`` or (``teacher_ids`` and ``teacher_log_probs``)."""
    sparse = ids is not None or log_probs is not None
    if dense is None and not sparse:
        raise ValueError(
            f"{who}: pass the teacher: {dense_name}, or teacher_ids with teacher_log_probs"
        )
    if dense is not None and sparse:
        raise ValueError(
            f"{who}: pass one teacher form: {dense_name}, or teacher_ids with "
            "teacher_log_probs, not both"
        )
    if sparse and (ids is None or log_probs is None):
        raise ValueError(f"{who}: teacher_ids and teacher_log_probs go together; pass both")


def check_sparse_and_target(
    who: str,
    lead: tuple[int, ...],
    V: int,
    device: torch.device,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Checks the sparse teacher and the target against the leading shape ``lead``; returns
    them as rows: ids (M, k) int64, log_probs (M, k), target (M,) int64, contiguous."""
    if ids is not None:
        for name, t in (("teacher_ids", ids), ("teacher_log_probs", log_probs)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"{who}: {name} is on {t.device}, the logits on {device}")
        if ids.dtype != torch.int64:
            raise TypeError(f"{who}: teacher_ids must be int64, got {ids.dtype}")
        if not log_probs.is_floating_point():
            raise TypeError(f"{who}: teacher_log_probs must be floating, got {log_probs.dtype}")
        _refuse_grad(who, "teacher_log_probs", log_probs)
        if ids.shape != log_probs.shape:
            raise ValueError(
                f"{who}: teacher_ids {tuple(ids.shape)} and teacher_log_probs "
                f"{tuple(log_probs.shape)} must have the same shape"
            )
        if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead:
            raise ValueError(
                f"{who}: teacher_ids must have shape {(*lead, 'k')} for logits of leading "
                f"shape {lead}, got {tuple(ids.shape)}"
            )
        k = ids.shape[-1]
        if k == 0:
            raise ValueError(f"{who}: teacher_ids has no column (k = 0); k must be >= 1")
        ids = ids.reshape(-1, k).contiguous()
        log_probs = log_probs.reshape(-1, k).contiguous()
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"{who}: target must be a tensor, got {type(target).__name__}")
        if target.device != device:
            raise ValueError(f"{who}: target is on {target.device}, the logits on {device}")
        if target.dtype not in INDEX_DTYPES:
            raise TypeError(
                f"{who}: target holds class indices: int64, int32 or uint8, got {target.dtype}"
            )
        if tuple(target.shape) != lead:
            raise ValueError(
                f"{who}: target must have the logits' leading shape {lead}, got "
                f"{tuple(target.shape)}"
            )
        target = target.reshape(-1).long().contiguous()
    elif opts.hard_weight > 0.0:
        raise ValueError(f"{who}: hard_weight > 0 mixes in the cross-entropy: pass target")
    return ids, log_probs, target


def _check_and_flatten(
    who: str,
    logits: Tensor,
    teacher_logits: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    sharded: bool = False,
) -> tuple[Tensor, Teacher, Tensor | None, tuple[int, ...]]:
    """Checks the tensors; returns (logits (M, V), teacher rows, target (M,) or None, the
    leading shape)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{who}: logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{who}: logits must be floating, got {logits.dtype}")
    # A vocabulary slice may hold no class (a rank of a skewed split); a whole row may not.
    if logits.dim() == 0 or (logits.shape[-1] == 0 and not sharded):
        raise ValueError(f"{who}: logits must have shape (..., V) with V >= 1")
    check_teacher_form(who, teacher_logits, ids, log_probs)
    lead = tuple(logits.shape[:-1])
    V = logits.shape[-1]
    if teacher_logits is not None:
        if not isinstance(teacher_logits, Tensor):
            raise TypeError(f"{who}: teacher_logits must be a tensor")
        _refuse_grad(who, "teacher_logits", teacher_logits)
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"{who}: teacher_logits {tuple(teacher_logits.shape)} must have the logits' "
                f"shape {tuple(logits.shape)}"
            )
        if teacher_logits.dtype != logits.dtype:
            raise TypeError(
                f"{who}: teacher_logits is {teacher_logits.dtype}, the logits {logits.dtype}: "
                "pass both in one dtype"
            )
        if teacher_logits.device != logits.device:
            raise ValueError(
                f"{who}: teacher_logits is on {teacher_logits.device}, the logits on "
                f"{logits.device}"
            )
        teacher_logits = _rows(teacher_logits, V)
    ids, log_probs, target = check_sparse_and_target(
        who, lead, V, logits.device, ids, log_probs, target, opts
    )
    return _rows(logits, V), Teacher(teacher_logits, ids, log_probs), target, lead


def _rows(t: Tensor, V: int) -> Tensor:
    """(M, V) with unit stride along V (a copy only where the input lacks it)."""
    t = t.reshape(math.prod(t.shape[:-1]), V)  # not -1: V may be 0 on a vocabulary slice
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# Eager autograd
# --------------------------------------------------------------------------------------------


class _FusedDistillation(torch.autograd.Function):
    """Scalar reductions: the gradient computed in forward, scaled in backward. "none": backward
    runs the rows again with each row's upstream factor folded in (one rounding)."""

    @staticmethod
    def forward(ctx, logits, teacher_logits, ids, log_probs, target, opts, who):  # type: ignore[override]
        grad_now = not opts.per_row
        V = logits.shape[1]
        pending = distill_core.check_values(
            who, V, ids, log_probs, target, opts.ignore_index, defer=True
        )
        loss, _, grad = distill_core.forward(
            logits, teacher_logits, ids, log_probs, target, opts, grad_now
        )
        keep = opts.per_row
        ctx.save_for_backward(
            logits if keep else None,
            teacher_logits if keep else None,
            ids if keep else None,
            log_probs if keep else None,
            target if keep else None,
        )
        ctx.opts, ctx.who, ctx.grad, ctx.pending, ctx.consumed = opts, who, grad, pending, False
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"fusedce.{ctx.who}: double backward (create_graph=True) is not supported"
            )
        if ctx.pending is not None:
            ctx.pending.resolve()
        if ctx.consumed:
            raise RuntimeError(
                f"fusedce.{ctx.who}: backward ran twice through the same graph "
                "(retain_graph=True); compute the loss again for a second backward"
            )
        opts = ctx.opts
        if opts.per_row:
            logits, teacher_logits, ids, log_probs, target = ctx.saved_tensors
            _, _, grad = distill_core.forward(
                logits, teacher_logits, ids, log_probs, target, opts, False, grad_output
            )
        else:
            grad = ctx.grad
            core.apply_upstream_grad_(grad, grad_output)
            ctx.consumed = True
        ctx.grad = None
        return grad, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees
# --------------------------------------------------------------------------------------------


def _opts_of(args: tuple) -> DistillOptions:
    return DistillOptions(*args)


@torch.library.custom_op("fusedce::distillation_loss", mutates_args=())
def _distillation_op(
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
    opts = _opts_of((divergence, beta, temperature, tail, ignore_index, hard_weight, reduction))
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if teacher_logits is not None and teacher_logits.stride(-1) != 1:
        teacher_logits = teacher_logits.contiguous()
    V = logits.shape[1]
    distill_core.check_values(
        who, V, teacher_ids, teacher_log_probs, target, ignore_index, defer=False
    )
    loss, _, grad = distill_core.forward(
        logits, teacher_logits, teacher_ids, teacher_log_probs, target, opts, grad_now
    )
    # "none" returns the row losses: a fresh tensor, never aliasing an input.
    return loss, grad if grad is not None else logits.new_empty((0,))


@_distillation_op.register_fake
def _(logits, teacher_logits, teacher_ids, teacher_log_probs, target, *args, **kwargs):
    reduction = args[6] if len(args) > 6 else kwargs["reduction"]
    grad_now = args[7] if len(args) > 7 else kwargs["grad_now"]
    acc = accumulation_dtype(logits.dtype)
    M = logits.shape[0]
    loss = logits.new_empty((M,) if reduction == "none" else (), dtype=acc)
    return loss, logits.new_empty(logits.shape if grad_now else (0,))


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
    opts = _opts_of((divergence, beta, temperature, tail, ignore_index, hard_weight, "none"))
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if teacher_logits is not None and teacher_logits.stride(-1) != 1:
        teacher_logits = teacher_logits.contiguous()
    _, _, grad = distill_core.forward(
        logits, teacher_logits, teacher_ids, teacher_log_probs, target, opts, False, row_factor
    )
    return grad


@_distillation_grad_op.register_fake
def _(logits, *_args, **_kwargs):
    return logits.new_empty(logits.shape)  # contiguous, as the real op's


def _op_setup_context(ctx, inputs, output):
    logits, teacher_logits, ids, log_probs, target = inputs[:5]
    ctx.opts_args = inputs[5:12]
    ctx.who = inputs[13]
    per_row = inputs[11] == "none"
    ctx.save_for_backward(
        logits if per_row else None,
        teacher_logits if per_row else None,
        ids if per_row else None,
        log_probs if per_row else None,
        target if per_row else None,
        output[1],
    )


def _op_backward(ctx, grad_loss, _grad_of_grad):
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fusedce.{ctx.who}: double backward (create_graph=True) is not supported"
        )
    logits, teacher_logits, ids, log_probs, target, grad = ctx.saved_tensors
    if ctx.opts_args[6] == "none":
        grad_logits = _distillation_grad_op(
            logits, teacher_logits, ids, log_probs, target, grad_loss, *ctx.opts_args[:6]
        )
    else:
        grad_logits = grad * grad_loss.to(grad.dtype)
    return (grad_logits,) + (None,) * 13


_distillation_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def wants_group(who: str, process_group: object) -> bool:
    """Whether a call runs vocabulary-parallel: a ``ProcessGroup`` of more than one rank (None,
    as ``torch.distributed.group.WORLD`` before ``init_process_group``, and a group of one rank
    run the plain function)."""
    if process_group is None:
        return False
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{who}: process_group is given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{who}: process_group must be a torch.distributed.ProcessGroup, got "
            f"{type(process_group).__name__}"
        )
    return dist.get_world_size(process_group) > 1


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
            of the whole vocabulary, O(N k) numbers exchanged, never the logits.

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
    """
    who = _WHO
    sharded = wants_group(who, process_group)
    # Vocabulary-parallel: a rank whose arguments are refused still joins the ranks' agreement
    # (one all_gather), so that every rank raises instead of waiting for it.
    refused = None
    try:
        opts = check_distill_options(
            who, divergence, beta, temperature, tail, ignore_index, hard_weight, reduction
        )
        x, teacher, target, lead = _check_and_flatten(
            who, logits, teacher_logits, teacher_ids, teacher_log_probs, target, opts, sharded
        )
    except (TypeError, ValueError, IndexError) as err:
        if not sharded:
            raise
        refused = err
    if sharded:
        device = logits.device if isinstance(logits, Tensor) else torch.device("cpu")
        width = 0 if refused is not None else x.shape[1]
        v0, V = distill_sharded.agree(who, width, refused, process_group, device)
        args = (x, teacher.logits, teacher.ids, teacher.log_probs, target, opts, process_group)
        return distill_sharded.distillation_loss_sharded(who, *args, v0, V).reshape(
            lead if opts.per_row else ()
        )
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if torch.compiler.is_compiling():
        grad_now = need_grad and not opts.per_row
        tensors = (x, teacher.logits, teacher.ids, teacher.log_probs, target)
        loss, _ = _distillation_op(*tensors, *opts.as_args(), grad_now=grad_now, who=who)
    elif need_grad:
        loss = _FusedDistillation.apply(
            x, teacher.logits, teacher.ids, teacher.log_probs, target, opts, who
        )
    else:
        with index_check.reporting_as(who):
            distill_core.check_values(
                who, x.shape[1], teacher.ids, teacher.log_probs, target, opts.ignore_index, False
            )
        loss, _, _ = distill_core.forward(
            x, teacher.logits, teacher.ids, teacher.log_probs, target, opts, False
        )
    return loss.reshape(lead) if opts.per_row else loss
