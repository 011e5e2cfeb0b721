"""``linear_distillation_loss``: ``distillation_loss`` of ``input @ W.T + b`` on the fused head,
never holding more than one chunk of (rows, V) logits (and, for a dense teacher, the teacher's
chunk of the same rows beside it).

For each chunk of token rows: the student's logits into one reused buffer, the teacher's
(``teacher_input @ teacher_weight.T + teacher_bias``) into a second where the teacher is dense;
the distillation rows (``distill_core.run_rows``) write the row losses and overwrite the
student's logits IN PLACE with the scaled gradient; then ``grad_x_c = g @ W``,
``grad_W += g.T @ x_c`` and ``grad_b += g.sum(0)`` (``linear_chunks``' pieces). Scalar
reductions compute the three gradients in forward (backward scales them); "none" runs the loop
again in backward with each row's upstream factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import core, distill_core, distill_sharded
from .distill_options import DistillOptions, check_distill_options
from .distillation import (
    Teacher,
    check_sparse_and_target,
    check_teacher_form,
    wants_group,
)
from .linear_chunks import WeightGrad, _chunk_logits, planned_chunk_rows
from .options import accumulation_dtype, check_chunk_size

__all__ = ["linear_distillation_loss"]

_WHO = "linear_distillation_loss"


class DenseTeacher:
    """A dense teacher head: rows ``input`` (N, D_t), ``weight`` (V, D_t), ``bias`` (V,) or
    None; its logits are made chunk by chunk."""

    __slots__ = ("bias", "input", "weight")

    def __init__(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        self.input, self.weight, self.bias = input, weight, bias


def chunked_distill(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    dense: DenseTeacher | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    chunk_rows: int,
    scale: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One sweep over the token chunks: the (N,) row losses and (optionally) the gradients.

    Args:
        x: (N, D) input rows, contiguous. W: (V, D). b: (V,) or None.
        dense: the dense teacher head, or None (then ``ids`` (N, k) and ``log_probs`` (N, k)).
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
            return chunked_distill(
                x, W, b, dense, ids, log_probs, target, opts, chunk_rows, scale, needs
            )
    N = x.shape[0]
    V = W.shape[0]
    acc = accumulation_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc, device=x.device)
    want = scale is not None
    per_row = want and scale.dim() == 1
    gx = torch.empty_like(x) if want and needs[0] else None
    gw = WeightGrad(W, "float32") if want and needs[1] else None
    gb = torch.zeros(V, dtype=acc, device=x.device) if want and needs[2] else None
    rows = min(chunk_rows, N)
    buf = torch.empty((rows, V), dtype=x.dtype, device=x.device)
    tbuf = None
    if dense is not None:
        tbuf = torch.empty((rows, V), dtype=dense.input.dtype, device=x.device)
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        x_c = x[start:end]
        logits = _chunk_logits(x_c, W, b, buf[: end - start])
        t_logits = None
        if dense is not None:
            t_logits = _chunk_logits(
                dense.input[start:end], dense.weight, dense.bias, tbuf[: end - start]
            )
        distill_core.run_rows(
            logits,
            t_logits,
            ids[start:end] if ids is not None else None,
            log_probs[start:end] if log_probs is not None else None,
            target[start:end] if target is not None else None,
            opts,
            loss[start:end],
            logits if want else None,  # the gradient over the logits: one rounding
            scale[start:end] if per_row else scale,
        )
        if not want:
            continue
        if gx is not None:
            torch.mm(logits, W, out=gx[start:end])
        if gw is not None:
            gw.add(logits, x_c)
        if gb is not None:
            gb += logits.sum(0, dtype=acc)
    del buf, tbuf
    grad_w = gw.result() if gw is not None else None
    grad_b = gb.to(b.dtype) if gb is not None and b is not None else None
    return loss, gx, grad_w, grad_b


def _scaled(g: Tensor | None, factor: Tensor) -> Tensor | None:
    """``g *= factor`` in place, without a host sync on CUDA: a factor of exactly 1 moves no
    data (the weight's gradient is the size of the head); None stays None."""
    if g is None:
        return None
    core.apply_upstream_grad_(g.reshape(1, -1) if g.dim() == 1 else g, factor)
    return g


class _FusedLinearDistillation(torch.autograd.Function):
    """Scalar reductions: the three gradients computed in forward, scaled in backward. "none":
    backward runs the chunk loop again with each row's upstream factor."""

    @staticmethod
    def forward(ctx, x, W, b, dense_x, dense_w, dense_b, ids, log_probs, target, opts, rows, who):  # type: ignore[override]
        dense = DenseTeacher(dense_x, dense_w, dense_b) if dense_x is not None else None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        V = W.shape[0]
        ctx.pending = distill_core.check_values(
            who, V, ids, log_probs, target, opts.ignore_index, defer=True
        )
        scale = distill_core.mean_scale(x.shape[0], target, opts, x)
        if opts.per_row:
            loss, *_ = chunked_distill(
                x, W, b, dense, ids, log_probs, target, opts, rows, None, needs
            )
            ctx.save_for_backward(x, W, b, dense_x, dense_w, dense_b, ids, log_probs, target)
            ctx.grads = None
        else:
            rows_loss, gx, gw, gb = chunked_distill(
                x, W, b, dense, ids, log_probs, target, opts, rows, scale, needs
            )
            loss = distill_core.reduce(rows_loss, scale, opts)
            ctx.grads = (gx, gw, gb)
        ctx.opts, ctx.rows, ctx.needs, ctx.who = opts, rows, needs, who
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"fusedce.{ctx.who}: double backward (create_graph=True) is not supported"
            )
        if ctx.pending is not None:
            ctx.pending.resolve()
        if ctx.opts.per_row:
            x, W, b, dense_x, dense_w, dense_b, ids, log_probs, target = ctx.saved_tensors
            dense = DenseTeacher(dense_x, dense_w, dense_b) if dense_x is not None else None
            factor = grad_output.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous()
            _, gx, gw, gb = chunked_distill(
                x, W, b, dense, ids, log_probs, target, ctx.opts, ctx.rows, factor, ctx.needs
            )
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    f"fusedce.{ctx.who}: backward ran twice through the same graph "
                    "(retain_graph=True); compute the loss again for a second backward"
                )
            gx, gw, gb = (_scaled(g, grad_output) for g in ctx.grads)
            ctx.grads = None
        return (gx, gw, gb) + (None,) * 9


# --------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedce::linear_distillation_loss", mutates_args=())
def _linear_distillation_op(
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
    who: str = _WHO,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_W, grad_b): the gradients of the reduced loss for scalar reductions
    where asked, else empty tensors; every output contiguous."""
    opts = DistillOptions(divergence, beta, temperature, tail, ignore_index, hard_weight, reduction)
    x, W = x.contiguous(), W.contiguous()
    dense = None
    if teacher_x is not None:
        dense = DenseTeacher(teacher_x.contiguous(), teacher_w.contiguous(), teacher_b)
    distill_core.check_values(who, W.shape[0], ids, log_probs, target, ignore_index, False)
    scale = distill_core.mean_scale(x.shape[0], target, opts, x)
    needs = (need_x, need_w, need_b and b is not None)
    grads = not opts.per_row and any(needs)
    rows_loss, gx, gw, gb = chunked_distill(
        x, W, b, dense, ids, log_probs, target, opts, chunk_rows, scale if grads else None, needs
    )
    loss = distill_core.reduce(rows_loss, scale, opts)
    return loss, _or(gx, x), _or(gw, x), _or(gb, x)


def _or(t: Tensor | None, like: Tensor) -> Tensor:
    """``t``, or a new empty tensor (one per output: an op's outputs may not alias)."""
    return t if t is not None else like.new_empty((0,))


@_linear_distillation_op.register_fake
def _(x, W, b, *args, **kwargs):
    a = dict(zip(_OP_OPTION_NAMES, args[6:], strict=False))
    a.update(kwargs)
    per_row = a["reduction"] == "none"
    loss = x.new_empty((x.shape[0],) if per_row else (), dtype=accumulation_dtype(x.dtype))
    gx = x.new_empty(x.shape if a["need_x"] and not per_row else (0,))
    gw = W.new_empty(W.shape) if a["need_w"] and not per_row else x.new_empty((0,))
    gb = b.new_empty(b.shape) if b is not None and a["need_b"] and not per_row else None
    gb = gb if gb is not None else x.new_empty((0,))
    return loss, gx, gw, gb


_OP_OPTION_NAMES = (
    "divergence",
    "beta",
    "temperature",
    "tail",
    "ignore_index",
    "hard_weight",
    "reduction",
    "chunk_rows",
    "need_x",
    "need_w",
    "need_b",
)


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
    x, W = x.contiguous(), W.contiguous()
    dense = None
    if teacher_x is not None:
        dense = DenseTeacher(teacher_x.contiguous(), teacher_w.contiguous(), teacher_b)
    factor = row_factor.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous()
    needs = (need_x, need_w, need_b and b is not None)
    _, gx, gw, gb = chunked_distill(
        x, W, b, dense, ids, log_probs, target, opts, chunk_rows, factor, needs
    )
    return _or(gx, x), _or(gw, x), _or(gb, x)


@_linear_distillation_grad_op.register_fake
def _(x, W, b, *args, **kwargs):
    names = ("row_factor", *_OP_OPTION_NAMES[:6], *_OP_OPTION_NAMES[7:])
    a = dict(zip(names, args[6:], strict=False))
    a.update(kwargs)
    gx = x.new_empty(x.shape if a["need_x"] else (0,))
    gw = W.new_empty(W.shape) if a["need_w"] else x.new_empty((0,))
    gb = b.new_empty(b.shape) if b is not None and a["need_b"] else x.new_empty((0,))
    return gx, gw, gb


def _op_setup_context(ctx, inputs, output):
    tensors = inputs[:9]
    ctx.options = inputs[9:15]  # divergence .. hard_weight
    ctx.per_row = inputs[15] == "none"
    ctx.rest = inputs[16:20]  # chunk_rows, need_x, need_w, need_b
    ctx.who = inputs[20]
    if ctx.per_row:
        ctx.save_for_backward(*tensors)
    else:
        ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad_loss, *_grads_of_grads):
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fusedce.{ctx.who}: double backward (create_graph=True) is not supported"
        )
    if ctx.per_row:
        tensors = ctx.saved_tensors
        gx, gw, gb = _linear_distillation_grad_op(*tensors, grad_loss, *ctx.options, *ctx.rest)
    else:
        gx, gw, gb = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    _, need_x, need_w, need_b = ctx.rest
    return (
        gx if need_x else None,
        gw if need_w else None,
        gb if need_b and gb.numel() else None,
    ) + (None,) * 18


_linear_distillation_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _check_head(
    who: str,
    input: Tensor,
    W: Tensor,
    b: Tensor | None,
    names: tuple[str, str, str],
    sharded: bool = False,
) -> None:
    """The tensors of one head: floating, one dtype and device, W (V, D) against input
    (..., D), b (V,)."""
    n_in, n_w, n_b = names
    for name, t in ((n_in, input), (n_w, W), (n_b, b)):
        if t is None and name == n_b:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{who}: {name} must be floating, got {t.dtype}")
        if t.dtype != input.dtype:
            raise TypeError(
                f"{who}: {name} is {t.dtype}, {n_in} {input.dtype}: pass one dtype per head"
            )
        if t.device != input.device:
            raise ValueError(f"{who}: {name} is on {t.device}, {n_in} on {input.device}")
    if input.dim() == 0:
        raise ValueError(f"{who}: {n_in} must have shape (..., D)")
    # A vocabulary slice may hold no class (a rank of a skewed split); a whole head may not.
    if W.dim() != 2 or W.shape[1] != input.shape[-1] or (W.shape[0] == 0 and not sharded):
        raise ValueError(
            f"{who}: {n_w} must have shape (V, D) with V >= 1 and D = {n_in}.shape[-1] = "
            f"{input.shape[-1]}, got {tuple(W.shape)}"
        )
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"{who}: {n_b} must have shape ({W.shape[0]},), got {tuple(b.shape)}")


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
            input's gradient is all-reduced inside.
        chunk_size: token rows per chunk (>= 1), or None: as many as fit 256 MiB of logits on
            a GPU (32 MiB on the CPU).

    Returns:
        float32 (float64 for float64 input): a scalar, or the leading shape for "none".
        Gradients reach ``input``, ``linear_weight`` and ``linear_bias`` only.

    Raises:
        ValueError, TypeError, IndexError: as ``distillation_loss``, and for the heads' shapes,
            dtypes and devices; messages start with ``linear_distillation_loss``.
    """
    who = _WHO
    sharded = wants_group(who, process_group)
    # Vocabulary-parallel: a rank whose arguments are refused still joins the ranks'
    # agreement (one all_gather), so that every rank raises instead of waiting.
    refused = None
    try:
        opts = check_distill_options(
            who, divergence, beta, temperature, tail, ignore_index, hard_weight, reduction
        )
        check_chunk_size(who, chunk_size)
        names = ("input", "linear_weight", "linear_bias")
        _check_head(who, input, linear_weight, linear_bias, names, sharded)
        dense_given = teacher_input is not None or teacher_weight is not None
        check_teacher_form(
            who,
            teacher_input if dense_given else None,
            teacher_ids,
            teacher_log_probs,
            dense_name="teacher_input with teacher_weight",
        )
        lead = tuple(input.shape[:-1])
        V = linear_weight.shape[0]
        dense_x = None
        if dense_given:
            if teacher_input is None or teacher_weight is None:
                raise ValueError(f"{who}: teacher_input and teacher_weight go together; pass both")
            names = ("teacher_input", "teacher_weight", "teacher_bias")
            _check_head(who, teacher_input, teacher_weight, teacher_bias, names, sharded)
            for name, t in zip(names, (teacher_input, teacher_weight, teacher_bias), strict=True):
                if t is not None and t.requires_grad:
                    raise ValueError(
                        f"{who}: {name} requires grad; the teacher is not differentiated "
                        f"(gradients reach the student only): pass {name}.detach()"
                    )
            if teacher_weight.shape[0] != V:
                raise ValueError(
                    f"{who}: teacher_weight has {teacher_weight.shape[0]} classes, "
                    f"linear_weight {V}"
                )
            if tuple(teacher_input.shape[:-1]) != lead:
                raise ValueError(
                    f"{who}: teacher_input {tuple(teacher_input.shape)} must have the input's "
                    f"leading shape {lead}"
                )
            if teacher_input.device != input.device:
                raise ValueError(
                    f"{who}: the teacher is on {teacher_input.device}, the input on {input.device}"
                )
            dense_x = teacher_input.reshape(-1, teacher_input.shape[-1]).contiguous()
        ids, log_probs, target = check_sparse_and_target(
            who, lead, V, input.device, teacher_ids, teacher_log_probs, target, opts
        )
        teacher = Teacher(None, ids, log_probs)
        x = input.reshape(-1, input.shape[-1]).contiguous()
        N = x.shape[0]
        rows = planned_chunk_rows(N, V, x.dtype, chunk_size, x.device)
        W, b = linear_weight, linear_bias
        dense_w = teacher_weight if dense_given else None
        dense_b = teacher_bias if dense_given else None
    except (TypeError, ValueError, IndexError) as err:
        if not sharded:
            raise
        refused = err
    if sharded:
        device = input.device if isinstance(input, Tensor) else torch.device("cpu")
        width = 0 if refused is not None else V
        v0, V_all = distill_sharded.agree(who, width, refused, process_group, device)
    grad_enabled = torch.is_grad_enabled()
    wants = [grad_enabled and t is not None and t.requires_grad for t in (input, W, b)]
    if sharded:
        distill_core.check_values(who, V_all, ids, log_probs, target, opts.ignore_index, False)
        heads = (x, W, b, dense_x, dense_w, dense_b)
        loss = distill_sharded.ShardedLinearDistillation.apply(
            *heads, ids, log_probs, target, opts, rows, v0, V_all, process_group
        )
    elif torch.compiler.is_compiling():
        heads = (x, W, b, dense_x, dense_w, dense_b)
        loss, *_ = _linear_distillation_op(
            *heads, teacher.ids, teacher.log_probs, target, *opts.as_args(), rows, *wants, who
        )
    elif any(wants):
        heads = (x, W, b, dense_x, dense_w, dense_b)
        loss = _FusedLinearDistillation.apply(
            *heads, teacher.ids, teacher.log_probs, target, opts, rows, who
        )
    else:
        distill_core.check_values(who, V, ids, log_probs, target, opts.ignore_index, False)
        dense = DenseTeacher(dense_x, dense_w, dense_b) if dense_given else None
        loss_rows, *_ = chunked_distill(
            x, W, b, dense, ids, log_probs, target, opts, rows, None, (False,) * 3
        )
        scale = distill_core.mean_scale(N, target, opts, x)
        loss = distill_core.reduce(loss_rows, scale, opts)
    return loss.reshape(lead) if opts.per_row else loss
