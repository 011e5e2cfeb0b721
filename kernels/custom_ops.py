"""The ``torch.library`` custom ops of the two losses, with their fakes and autograd formulas:
what ``torch.compile`` sees of ``cross_entropy`` and ``linear_cross_entropy``.

``fusedce::cross_entropy`` (loss, fused gradient, per-row stats) and
``fusedce::cross_entropy_grad`` (the ``reduction="none"`` gradient from the stats);
``fusedce::linear_cross_entropy`` (loss, three gradients, stats) and
``fusedce::linear_cross_entropy_backward`` (the ``"none"`` recomputation). The ops take inputs
of any strides and return contiguous outputs, which the fakes report exactly; backward is out
of place (graphs may reuse its buffers). The options cross the boundary as ``to_op_args`` /
``from_op_args`` (``options.py``).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from . import core, index_check
from .autograd_functions import Plan, mean_gradient_scale, no_double_backward, run_chunks
from .index_check import check_class_indices
from .options import (
    LossOptions,
    accumulation_dtype,
    from_op_args,
    has_float_options,
    index_target_for_kernels,
    prepare_class_weight,
    prepare_token_weight,
)
from .validation import check_token_weight_values


def op_arguments(op: object, args: tuple, kwargs: dict) -> dict[str, object]:
    """A custom op's arguments by name, defaults filled in (from its schema): what its fake
    kernel reads, without repeating the op's signature."""
    named = {}
    for i, arg in enumerate(op._opoverload._schema.arguments):
        if i < len(args):
            named[arg.name] = args[i]
        else:
            named[arg.name] = kwargs.get(arg.name, arg.default_value)
    return named


def float_options_as_tensor(logits: Tensor, opts: LossOptions, target_grad: bool) -> bool:
    """Whether a compiled call passes its float options to the custom op in a tensor (one graph
    for every value of a float that changes between calls; see
    ``options.float_options_tensor``) rather than as floats (one graph per value, as torch's
    own ``F.cross_entropy`` compiles ``label_smoothing``).

    The tensor is a CPU tensor, read on the host: on the CPU that is free. CUDA logits keep
    the floats: a CPU tensor in the graph would keep Inductor from CUDA graphs, and a device
    tensor would cost a host sync per call. The target's gradient (probability targets that
    require grad) is computed from the floats in backward, so it keeps them too.
    """
    return logits.device.type == "cpu" and not target_grad and has_float_options(opts)


# --------------------------------------------------------------------------------------------
# fusedce::cross_entropy and its gradient op
# --------------------------------------------------------------------------------------------


def _op_layout(
    rows: Tensor,
    target: Tensor,
    weight: Tensor | None,
    token_weight: Tensor | None,
    ignore_index: int,
    contiguous: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The layout the backends and the chunked loop read: ``rows`` (the logits, or the head's
    x) with unit stride along the last dimension (``contiguous``: contiguous, as the head's x
    and hence its gradient), probability targets likewise, class indices in a kernel dtype,
    contiguous weights. The custom ops are callable directly, with any strides; no copy for
    what ``cross_entropy`` / ``linear_cross_entropy`` pass them."""
    if contiguous or rows.stride(-1) != 1:
        rows = rows.contiguous()
    if target.dim() == 2:
        if target.stride(-1) != 1:
            target = target.contiguous()
    else:
        target = index_target_for_kernels(target, ignore_index)
    weight = prepare_class_weight(weight, rows.dtype)
    token_weight = prepare_token_weight(token_weight, rows.dtype)
    return rows, target, weight, token_weight


def _op_options(args: dict[str, object]) -> LossOptions:
    """The ``LossOptions`` of a custom op's arguments by name (``from_op_args``); the gradient
    ops, which take no reduction, are ``"none"``."""
    return from_op_args(**{"reduction": "none"} | {k: args[k] for k in _OP_OPTIONS if k in args})


_OP_OPTIONS = tuple(inspect.signature(from_op_args).parameters)
# The tensors the forward ops save for their gradient op (not passed through as arguments).
_SAVED = ("logits", "x", "W", "b", "target", "weight", "token_weight")


def _grad_op_options(args: dict[str, object], grad_op: object) -> dict[str, object]:
    """The forward op's arguments (by name) that its gradient op takes as they are: the
    options, the float placeholders and ``float_options`` included; not the saved tensors."""
    names = op_arguments(grad_op, (), {}).keys() - set(_SAVED)
    return {k: v for k, v in args.items() if k in names}


def _fake_loss_and_stats(rows: Tensor, args: dict[str, object]) -> tuple[Tensor, Tensor]:
    """Meta loss (() or (M,) for "none") and (STAT_ROWS or EXTRA_STAT_ROWS, M) per-row stats
    of a forward op on ``rows`` (logits, or the head's x), in the accumulation dtype.
    ``new_empty``: contiguous, as every output of the real ops (``empty_like`` would keep the
    strides of a transposed input)."""
    M = rows.shape[0]
    acc = accumulation_dtype(rows.dtype)
    loss = rows.new_empty((M,) if args["reduction"] == "none" else (), dtype=acc)
    stat_rows = core.EXTRA_STAT_ROWS if args["extras"] else core.STAT_ROWS
    return loss, rows.new_empty((stat_rows, M), dtype=acc)


@torch.library.custom_op("fusedce::cross_entropy", mutates_args=())
def cross_entropy_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    grad_now: bool,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    extras: bool = False,
    who: str = "cross_entropy",
    float_options: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, gradient of the reduced loss or an empty tensor, (STAT_ROWS or EXTRA_STAT_ROWS, M)
    per-row stats); every output contiguous, whatever the inputs' strides. ``who``: the public
    function the error messages name.

    ``float_options``: the four float options as ``options.float_options_tensor`` (the floats
    are then placeholders), for values that change between compiled calls."""
    check_token_weight_values(who, token_weight)
    opts = _op_options(locals())
    logits, target, weight, token_weight = _op_layout(
        logits, target, weight, token_weight, ignore_index
    )
    with index_check.reporting_as(who):
        fwd = core.forward(
            logits, target, weight, opts, grad_now, token_weight=token_weight, extras=extras
        )
    grad = fwd.grad if fwd.grad is not None else logits.new_empty((0,))
    # "none" returns stats[LOSS] itself: an op's outputs may not alias each other.
    loss = fwd.loss.clone() if opts.per_row else fwd.loss
    return loss, grad, fwd.stats


@cross_entropy_op.register_fake
def _(*args, **kwargs):
    a = op_arguments(cross_entropy_op, args, kwargs)
    logits = a["logits"]
    loss, stats = _fake_loss_and_stats(logits, a)
    return loss, logits.new_empty(logits.shape if a["grad_now"] else (0,)), stats


@torch.library.custom_op("fusedce::cross_entropy_grad", mutates_args=())
def cross_entropy_grad_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    row_factor: Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    float_options: Tensor | None = None,
) -> Tensor:
    """reduction="none": the gradient written once from the forward's per-row stats; contiguous,
    whatever the inputs' strides."""
    opts = _op_options(locals())
    logits, target, weight, token_weight = _op_layout(
        logits, target, weight, token_weight, ignore_index
    )
    stats = stats.contiguous()
    return core.gradient_from_stats(
        logits, target, weight, opts, stats, row_factor, token_weight=token_weight
    )


@cross_entropy_grad_op.register_fake
def _(logits, *_args, **_kwargs):
    return logits.new_empty(logits.shape)  # contiguous, as the real op's


def _ce_setup_context(ctx, inputs, output):
    a = op_arguments(cross_entropy_op, inputs, {})
    # With float_options the four floats are placeholders: the gradient op reads the tensor
    # (the target's gradient, which reads opts here, never takes that route: see cross_entropy).
    ctx.opts = _op_options(a | {"float_options": None})
    ctx.who = a["who"]
    ctx.grad_op_options = _grad_op_options(a, cross_entropy_grad_op)
    target = a["target"]
    keep_logits = ctx.opts.per_row or target.requires_grad
    saved = (a["logits"] if keep_logits else None, target, a["weight"], *output[1:])
    ctx.save_for_backward(*saved, a["token_weight"])


def _ce_backward(ctx, grad_loss, _grad_of_grad, _grad_of_stats):
    no_double_backward(ctx.who)
    logits, target, weight, grad, stats, token_weight = ctx.saved_tensors
    opts = ctx.opts
    grad_logits = grad_target = None
    if ctx.needs_input_grad[1]:
        # The floats of opts are read here: never placeholders (see float_options_as_tensor).
        float_options = ctx.grad_op_options["float_options"]
        assert float_options is None, "fusedce: target gradient with tensor float options"
        mean_scale = 1.0
        if opts.mean:
            mean_scale = core.inverse_normaliser(
                core.mean_normaliser(target, weight, opts.ignore_index, stats.dtype, token_weight)
            )
        factor = grad_loss if opts.per_row else grad_loss * mean_scale
        grad_target = core.probability_target_grad(
            logits, stats, weight, opts, factor, token_weight
        )
        grad_target = grad_target.to(target.dtype)
    if ctx.needs_input_grad[0]:
        if opts.per_row:
            grad_logits = cross_entropy_grad_op(
                logits,
                target,
                weight,
                stats,
                grad_loss,
                token_weight=token_weight,
                **ctx.grad_op_options,
            )
        else:
            grad_logits = grad * grad_loss.to(grad.dtype)
    return (grad_logits, grad_target) + (None,) * 12


cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# --------------------------------------------------------------------------------------------
# fusedce::linear_cross_entropy and its backward op
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedce::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_rows: int,
    accumulation: str,
    needs: list[bool],
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    extras: bool = False,
    who: str = "linear_cross_entropy",
    float_options: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_W, grad_b, per-row stats (STAT_ROWS or EXTRA_STAT_ROWS, N)); the
    gradients are empty where not needed, and always for reduction="none" (computed in the
    backward op instead). Every output contiguous, whatever the inputs' strides. ``who``: the
    public function the error messages name.

    ``float_options``: the four float options as ``options.float_options_tensor`` (the floats
    are then placeholders), for values that change between compiled calls."""
    check_class_indices(target, W.shape[0], ignore_index, who)
    check_token_weight_values(who, token_weight)
    opts = _op_options(locals())
    x, target, weight, token_weight = _op_layout(
        x, target, weight, token_weight, ignore_index, True
    )
    plan = Plan(opts, chunk_rows, accumulation, extras, who)
    scale = mean_gradient_scale(target, weight, plan.opts, x, token_weight)
    grads_now = reduction != "none" and any(needs)
    stats, gx, gw, gb = run_chunks(
        x, W, b, target, weight, plan, scale if grads_now else None, tuple(needs), token_weight
    )
    loss = core.reduce_rows(stats[core.LOSS], scale, plan.opts)
    if reduction == "none":
        loss = loss.clone()  # an op's outputs may not alias each other
    return loss, *(g if g is not None else _empty(x) for g in (gx, gw, gb)), stats


def _empty(like: Tensor) -> Tensor:
    """Placeholder for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty((0,))


def _fake_grads(x: Tensor, W: Tensor, b: Tensor | None, now: bool, needs: list[bool]):
    """Meta outputs (grad_x, grad_W, grad_b) of the two ops, empty where not computed.

    Contiguous, as the real ops return them whatever the strides of x, W and b (``empty_like``
    would keep the strides of a transposed weight, e.g. a tied embedding's ``E.t()``)."""
    gx = x.new_empty(x.shape) if now and needs[0] else _empty(x)
    gw = W.new_empty(W.shape) if now and needs[1] else _empty(x)
    gb = b.new_empty(b.shape) if now and needs[2] and b is not None else _empty(x)
    return gx, gw, gb


@linear_cross_entropy_op.register_fake
def _(*args, **kwargs):
    a = op_arguments(linear_cross_entropy_op, args, kwargs)
    loss, stats = _fake_loss_and_stats(a["x"], a)
    return loss, *_fake_grads(a["x"], a["W"], a["b"], a["reduction"] != "none", a["needs"]), stats


@torch.library.custom_op("fusedce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_output: Tensor,
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    chunk_rows: int,
    accumulation: str,
    needs: list[bool],
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    float_options: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none": recompute the chunks with one upstream factor per row; contiguous
    gradients, whatever the inputs' strides."""
    opts = _op_options(locals())
    x, target, weight, token_weight = _op_layout(
        x, target, weight, token_weight, ignore_index, True
    )
    plan = Plan(opts, chunk_rows, accumulation)
    factor = grad_output.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous()
    _, gx, gw, gb = run_chunks(x, W, b, target, weight, plan, factor, tuple(needs), token_weight)
    return tuple(g if g is not None else _empty(x) for g in (gx, gw, gb))


@linear_cross_entropy_backward_op.register_fake
def _(*args, **kwargs):
    a = op_arguments(linear_cross_entropy_backward_op, args, kwargs)
    return _fake_grads(a["x"], a["W"], a["b"], True, a["needs"])


def _lce_setup_context(ctx, inputs, output):
    a = op_arguments(linear_cross_entropy_op, inputs, {})
    ctx.reduction, ctx.who = a["reduction"], a["who"]
    ctx.grad_op_options = _grad_op_options(a, linear_cross_entropy_backward_op)
    ctx.has_bias = a["b"] is not None
    if ctx.reduction == "none":
        ctx.save_for_backward(*(a[k] for k in ("x", "W", "b", "target", "weight", "token_weight")))
    else:
        ctx.save_for_backward(*output[1:4])


def _lce_backward(ctx, grad_loss, *_unused):
    no_double_backward(ctx.who)
    if ctx.reduction == "none":
        x, W, b, target, weight, token_weight = ctx.saved_tensors
        gx, gw, gb = linear_cross_entropy_backward_op(
            grad_loss, x, W, b, target, weight, token_weight=token_weight, **ctx.grad_op_options
        )
    else:
        gx, gw, gb = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    needs = ctx.grad_op_options["needs"]
    gx, gw = (g if need else None for g, need in zip((gx, gw), needs[:2], strict=True))
    gb = gb if needs[2] and ctx.has_bias else None
    return (gx, gw, gb) + (None,) * 15


linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)
