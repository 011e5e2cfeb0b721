"""``linear_cross_entropy`` and ``LinearCrossEntropyLoss``: the fused linear head.

``linear_cross_entropy(input, W, target)`` equals
``F.cross_entropy(F.linear(input, W, b), target)`` (the signature and semantics of PyTorch
2.13's ``torch.nn.functional.linear_cross_entropy``) but never materialises the full (N, V)
logits: ``linear_chunks.py`` walks the token rows in chunks. This file holds the argument
checks, the autograd Function and the custom ops.

With a scalar reduction the mean normaliser over ALL targets is computed first, so each chunk's
gradient is final up to ``grad_output``; backward only scales the three saved gradients. With
``reduction="none"`` (one upstream gradient per token) forward computes only the loss and
backward recomputes the chunks with the per-row factors folded into the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import core, func_transforms
from .core import CrossEntropyStats
from .cross_entropy_loss import _no_double_backward, op_arguments
from .index_check import check_class_indices
from .linear_chunks import Accumulation, chunked_pass, planned_chunk_rows
from .options import (
    CallOptions,
    LossOptions,
    accumulation_dtype,
    check_accumulation,
    check_chunk_size,
    check_class_index_dtype,
    check_class_weight,
    check_token_weight,
    check_token_weight_values,
    from_op_args,
    has_float_options,
    index_target_for_kernels,
    prepare_class_weight,
    prepare_token_weight,
    to_op_args,
)
from .sharded import route as sharded

__all__ = ["LinearCrossEntropyLoss", "linear_cross_entropy"]

_WHO = "linear_cross_entropy"


def _mean_gradient_scale(
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    x: Tensor,
    token_weight: Tensor | None = None,
) -> Tensor:
    """() device scalar: 1 / the mean normaliser over ALL rows (token weights included), or 1."""
    if not opts.mean:
        return torch.ones((), dtype=torch.float32, device=x.device)
    acc = accumulation_dtype(x.dtype)
    denom = core.mean_normaliser(target, weight, opts.ignore_index, acc, token_weight)
    return core.inverse_normaliser(denom)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _Plan:
    """How one call runs: the loss options plus the chunking (plain values, no tensors)."""

    __slots__ = ("accumulation", "chunk_rows", "extras", "opts", "who")

    def __init__(
        self,
        opts: LossOptions,
        chunk_rows: int,
        accumulation: str,
        extras: bool = False,
        who: str = _WHO,
    ) -> None:
        self.opts, self.chunk_rows, self.accumulation = opts, chunk_rows, accumulation
        self.extras = extras
        self.who = who  # the public function the messages name


def _pass(x, W, b, target, weight, plan: _Plan, scale, needs, token_weight=None):
    return chunked_pass(
        x,
        W,
        b,
        target,
        weight,
        plan.opts,
        plan.chunk_rows,
        plan.accumulation,
        scale,
        needs,
        token_weight,
        plan.extras,
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Scalar reductions: gradients computed in forward, scaled in backward. "none": recompute."""

    @staticmethod
    def forward(ctx, x, W, b, target, weight, plan, token_weight):  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.plan = plan
        if plan.opts.per_row:
            # Per-token upstream gradients are only known in backward: recompute there.
            stats, *_ = _pass(x, W, b, target, weight, plan, None, needs, token_weight)
            ctx.save_for_backward(x, W, b, target, weight, token_weight)
            loss, scale = stats[core.LOSS].clone(), None
        else:
            scale = _mean_gradient_scale(target, weight, plan.opts, x, token_weight)
            stats, gx, gw, gb = _pass(x, W, b, target, weight, plan, scale, needs, token_weight)
            ctx.grads = [gx, gw, gb]
            loss = core.reduce_rows(stats[core.LOSS], scale, plan.opts)
        ctx.mark_non_differentiable(*(t for t in (stats, scale) if t is not None))
        return loss, stats, scale

    @staticmethod
    def backward(ctx, grad_output, _grad_stats=None, _grad_scale=None):  # type: ignore[override]
        plan = ctx.plan
        _no_double_backward(plan.who)
        if plan.opts.per_row:
            x, W, b, target, weight, token_weight = ctx.saved_tensors
            needs = tuple(ctx.needs_input_grad[:3])
            factor = grad_output.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous()
            # The stats are not needed again: recompute without the extras.
            replan = _Plan(plan.opts, plan.chunk_rows, plan.accumulation, who=plan.who)
            _, gx, gw, gb = _pass(x, W, b, target, weight, replan, factor, needs, token_weight)
            return gx, gw, gb, None, None, None, None
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                f"fusedce.{plan.who}: backward ran twice through the same graph "
                "(retain_graph=True). The fused gradients are consumed by the first backward; "
                "compute the loss again for a second backward."
            )
        ctx.grads = None
        for grad in grads:
            if grad is not None:
                # In place, and without a host sync on CUDA: a factor of exactly 1 moves no data.
                core.apply_upstream_grad_(
                    grad.reshape(1, -1) if grad.dim() == 1 else grad, grad_output
                )
        return grads[0], grads[1], grads[2], None, None, None, None


# --------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (no graph break; backward out of place)
# --------------------------------------------------------------------------------------------


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


def _kernel_layout(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    token_weight: Tensor | None,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The layout the chunked loop reads (x contiguous, hence its gradient too; W and b may have
    any strides): the custom ops are callable directly. No copy for what
    ``linear_cross_entropy`` passes them."""
    return (
        x.contiguous(),
        index_target_for_kernels(target, ignore_index),
        prepare_class_weight(weight, x.dtype),
        prepare_token_weight(token_weight, x.dtype),
    )


@torch.library.custom_op("fusedce::linear_cross_entropy", mutates_args=())
def _lce_op(
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
    who: str = _WHO,
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
    x, target, weight, token_weight = _kernel_layout(x, target, weight, token_weight, ignore_index)
    opts = from_op_args(
        ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, float_options
    )
    plan = _Plan(opts, chunk_rows, accumulation, extras, who)
    scale = _mean_gradient_scale(target, weight, plan.opts, x, token_weight)
    grads_now = reduction != "none" and any(needs)
    stats, gx, gw, gb = _pass(
        x, W, b, target, weight, plan, scale if grads_now else None, tuple(needs), token_weight
    )
    loss = core.reduce_rows(stats[core.LOSS], scale, plan.opts)
    if reduction == "none":
        loss = loss.clone()  # an op's outputs may not alias each other
    return loss, *(g if g is not None else _empty(x) for g in (gx, gw, gb)), stats


@_lce_op.register_fake
def _(*args, **kwargs):
    a = op_arguments(_lce_op, args, kwargs)
    x, W, b, reduction, needs = a["x"], a["W"], a["b"], a["reduction"], a["needs"]
    extras = a["extras"]
    acc = accumulation_dtype(x.dtype)
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=acc)
    rows = core.EXTRA_STAT_ROWS if extras else core.STAT_ROWS
    stats = x.new_empty((rows, x.shape[0]), dtype=acc)
    return loss, *_fake_grads(x, W, b, reduction != "none", needs), stats


@torch.library.custom_op("fusedce::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(
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
    x, target, weight, token_weight = _kernel_layout(x, target, weight, token_weight, ignore_index)
    opts = from_op_args(
        ignore_index, label_smoothing, "none", logit_scale, softcap, z_loss, float_options
    )
    plan = _Plan(opts, chunk_rows, accumulation)
    factor = grad_output.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous()
    _, gx, gw, gb = _pass(x, W, b, target, weight, plan, factor, tuple(needs), token_weight)
    return tuple(g if g is not None else _empty(x) for g in (gx, gw, gb))


@_lce_backward_op.register_fake
def _(*args, **kwargs):
    a = op_arguments(_lce_backward_op, args, kwargs)
    return _fake_grads(a["x"], a["W"], a["b"], True, a["needs"])


def _lce_setup_context(ctx, inputs, output):
    x, W, b, target, weight, ignore_index, ls, reduction, chunk_rows, accumulation, needs = inputs[
        :11
    ]
    logit_scale, softcap, z_loss, token_weight, _, who, float_options = inputs[11:]
    ctx.reduction, ctx.who = reduction, who
    ctx.args = (ignore_index, ls, chunk_rows, accumulation, needs, logit_scale, softcap, z_loss)
    ctx.float_options = float_options
    ctx.has_bias = b is not None
    if reduction == "none":
        ctx.save_for_backward(x, W, b, target, weight, token_weight)
    else:
        ctx.save_for_backward(*output[1:4])


def _lce_backward(ctx, grad_loss, *_unused):
    _no_double_backward(ctx.who)
    if ctx.reduction == "none":
        x, W, b, target, weight, token_weight = ctx.saved_tensors
        gx, gw, gb = _lce_backward_op(
            grad_loss, x, W, b, target, weight, *ctx.args, token_weight, ctx.float_options
        )
    else:
        gx, gw, gb = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    needs = ctx.args[4]
    gx, gw = (g if need else None for g, need in zip((gx, gw), needs[:2], strict=True))
    gb = gb if needs[2] and ctx.has_bias else None
    return (gx, gw, gb) + (None,) * 15


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_tensors(
    who: str,
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
) -> None:
    """Raises a clear exception for any tensor linear_cross_entropy cannot take; ``who`` names
    the function the user called."""
    name = who
    for arg, what in ((input, "input"), (linear_weight, "linear_weight"), (target, "target")):
        if not isinstance(arg, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(arg).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name}: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{name}: input must have shape (D,), (N, D) or (..., D), got a scalar")
    if linear_weight.dim() != 2:
        if linear_weight.dim() > 2:
            raise NotImplementedError(
                f"{name}: K-dimensional linear_weight of shape {tuple(linear_weight.shape)} is "
                "not supported; pass a 2-D (V, D) weight"
            )
        raise ValueError(
            f"{name}: linear_weight must be 2-D (V, D), got {tuple(linear_weight.shape)}"
        )
    V, D = linear_weight.shape
    if V == 0:
        raise ValueError(f"{name}: linear_weight has 0 classes (shape {(V, D)})")
    if input.shape[-1] != D:
        raise ValueError(
            f"{name}: input has {input.shape[-1]} features (shape {tuple(input.shape)}) but "
            f"linear_weight of shape {(V, D)} expects D={D}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"{name}: input ({input.dtype}) and linear_weight ({linear_weight.dtype}) must "
            "have the same dtype"
        )
    devices = {("linear_weight", linear_weight.device), ("target", target.device)}
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (V,):
            shape = tuple(linear_bias.shape) if isinstance(linear_bias, Tensor) else linear_bias
            raise ValueError(f"{name}: linear_bias must have shape ({V},), got {shape}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(
                f"{name}: linear_bias ({linear_bias.dtype}) must have the input's dtype "
                f"({input.dtype})"
            )
        devices.add(("linear_bias", linear_bias.device))
    check_class_weight(name, weight, V, input.device)
    for what, device in sorted(devices, key=lambda d: d[0]):
        if device != input.device:
            raise ValueError(f"{name}: {what} is on {device} but input is on {input.device}")
    expected = tuple(input.shape[:-1])
    if target.is_floating_point() and tuple(target.shape) == (*expected, V):
        raise NotImplementedError(
            f"{name}: probability (soft) targets are not supported; pass class indices of shape "
            f"{expected}, or use fusedce.cross_entropy on materialised logits"
        )
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{name}: target of shape {tuple(target.shape)} does not fit input of shape "
            f"{tuple(input.shape)}: expected class indices of shape {expected}"
        )
    check_class_index_dtype(name, target)


def _check_options(who: str, call: CallOptions) -> tuple[LossOptions, int | None, str]:
    """The checked loss options, ``chunk_size`` and ``accumulation`` of ``call``."""
    opts = call.loss_options(who)
    check_chunk_size(who, call.chunk_size)
    check_accumulation(who, call.accumulation)
    return opts, call.chunk_size, call.accumulation


def _autocast_cast(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under autocast, run the GEMMs in the autocast dtype as F.linear would."""
    if not isinstance(input, Tensor):  # the checks that follow name the bad argument
        return input, linear_weight, linear_bias
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if t is None or t.dtype == torch.float64 else t.to(dtype)
    return cast(input), cast(linear_weight), cast(linear_bias)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    accumulation: Accumulation = "float32",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target)``, chunked and fused.

    The (N, V) logits are never materialised: at most ``chunk_size`` rows of logits exist at a
    time, and the gradient of each chunk overwrites its logits in place (see the module doc).

    Args:
        input: (D,), (N, D) or (..., D) hidden states, e.g. (B, T, D) from an LM; float32,
            float16, bfloat16 (or float64, computed in float64 by the torch fallback).
        linear_weight: (V, D) weight of the projection, e.g. ``lm_head.weight``; input's dtype.
        target: class indices (int64 or int32) of shape ``input.shape[:-1]``.
        linear_bias: optional (V,) bias of the projection, input's dtype.
        weight: optional (V,) class weights.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        ignore_index: class index that contributes neither loss nor gradient (None: -100).
        label_smoothing: amount in [0, 1] of uniform smoothing of the target distribution.
        chunk_size: token rows per chunk; None picks ``planned_chunk_rows`` (about 256 MiB of
            logits on GPU, 32 MiB on CPU). Need not divide N. Peak extra memory is about
            ``chunk_size * V * element_size`` plus the gradients.
        accumulation: "float32" (default) accumulates the half-precision weight gradient across
            chunks in a float32 (V, D) buffer, cast once at the end: as accurate as one GEMM
            over all tokens (on the CPU each chunk's bfloat16 product is rounded once first:
            within ~1.2x of that). "input" accumulates straight into the weight's dtype (rounded
            once per chunk) and saves those V * D * 4 bytes. No effect for float32 weights.
        logit_scale: s > 0; the loss sees z = s * logits.
        softcap: c > 0 or None; then z = c * tanh(z / c), after the scale.
        z_loss: lambda >= 0; each non-ignored token adds lambda * logsumexp(z)**2.
        token_weight: optional float tensor of the target's shape, finite and >= 0, not
            differentiated: token i contributes t_i * (l_i + lambda * lse_i**2); "mean" divides
            by sum_i t_i * w_{y_i} over the non-ignored tokens.
        return_stats: also return a ``CrossEntropyStats`` (z_loss part, lse, entropy,
            correct) from the chunks the loop computes anyway.
        process_group: a ``torch.distributed.ProcessGroup`` over which the vocabulary is split:
            ``linear_weight`` (and ``linear_bias``) are then this rank's rows, ``input`` is
            replicated and ``target`` holds global class indices; the input's gradient comes
            back all-reduced. See ``fusedce.vocab_parallel.vocab_parallel_linear_cross_entropy``
            (also taken for a ``DTensor`` linear_weight sharded by rows, without a group).
            None (the default) is the unsharded loss; so is ``torch.distributed.group.WORLD``
            before ``init_process_group``, which is None then.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or ``input.shape[:-1]`` for
        reduction="none"; with ``return_stats`` the tuple ``(loss, stats)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or options; a ``process_group``
            that is not a ProcessGroup. Every message starts with the name of the function
            called (``linear_cross_entropy``, or ``LinearCrossEntropyLoss`` for the module).
        IndexError: a class index outside [0, V) other than ignore_index.
        RuntimeError: a ``process_group`` while ``torch.distributed`` is not initialised.
        NotImplementedError: probability targets, K-dimensional linear_weight.

    Deviations from torch: the loss is float32 for half-precision input (as
    ``kernels.cross_entropy``); reduction="mean" over nothing (every target ignored, or no rows)
    gives 0 and zero gradients instead of NaN; any input shape (..., D) is accepted. As with
    torch's chunked path, backward twice through the same graph (retain_graph=True) raises for
    the scalar reductions, and higher-order gradients are not supported.
    """
    loss_args = (ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss)
    call = CallOptions(*loss_args, return_stats, chunk_size=chunk_size, accumulation=accumulation)
    head = (input, linear_weight, target, linear_bias, weight, token_weight)
    return _linear_cross_entropy(_WHO, *head, call, process_group)


def _linear_cross_entropy(
    who: str,
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    token_weight: Tensor | None,
    call: CallOptions,
    process_group: object = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``linear_cross_entropy`` for the public function ``who`` (``linear_cross_entropy``,
    ``LinearCrossEntropyLoss``, or the vocabulary-parallel head on one rank): every error
    names it."""
    compiling = torch.compiler.is_compiling()
    # Cast before any check: under autocast, F.linear would accept a float32 weight with a
    # bfloat16 input (both run in the autocast dtype), so the fused head must too.
    input, linear_weight, linear_bias = _autocast_cast(input, linear_weight, linear_bias)
    if sharded.wants_vocab_parallel(linear_weight, process_group):
        if func_transforms.active():
            raise func_transforms.refuse_sharded(who)
        sharded.refuse_unsharded_options(who, accumulation=call.accumulation)
        head = (input, linear_weight, target, linear_bias, weight, token_weight)
        return sharded.call_linear_cross_entropy(
            who, *head, call, process_group, plain=_linear_cross_entropy
        )
    opts, chunk_size, accumulation = _check_options(who, call)
    _check_tensors(who, input, linear_weight, target, linear_bias, weight)
    check_token_weight(who, token_weight, tuple(target.shape), input.device)
    V, D = linear_weight.shape
    out_shape = tuple(target.shape)
    x = input.reshape(-1, D).contiguous()
    t = index_target_for_kernels(target.reshape(-1), opts.ignore_index)
    weight = prepare_class_weight(weight, x.dtype)
    tw = prepare_token_weight(token_weight, x.dtype)
    extras = bool(call.return_stats)
    if func_transforms.active():
        # torch.func.grad / vmap / jacrev ...: differentiable torch ops, same semantics.
        return func_transforms.linear_cross_entropy(
            x, linear_weight, linear_bias, t, weight, opts, tw, out_shape, extras, who
        )
    if not compiling:  # the custom op checks inside, opaque to dynamo
        check_class_indices(t, V, opts.ignore_index, who)
    rows = planned_chunk_rows(x.shape[0], V, x.dtype, chunk_size, x.device)
    plan = _Plan(opts, rows, accumulation, extras, who)
    params = (input, linear_weight, linear_bias)
    need_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if compiling:
        needs = [need_grad and p is not None and p.requires_grad for p in params]
        # On the CPU the float options travel in a tensor: one graph for every value of a float
        # that changes between calls (see cross_entropy_loss._float_options_as_tensor).
        op_args = to_op_args(opts, x.device.type == "cpu" and has_float_options(opts))
        head = (x, linear_weight, linear_bias, t, weight)
        rest = {"chunk_rows": rows, "accumulation": accumulation, "needs": needs}
        rest.update(token_weight=tw, extras=extras, who=who)
        loss, *_, stats = _lce_op(*head, **rest, **op_args)
        scale = None
    elif need_grad:
        loss, stats, scale = _LinearCrossEntropy.apply(
            x, linear_weight, linear_bias, t, weight, plan, tw
        )
    else:
        scale = _mean_gradient_scale(t, weight, opts, x, tw)
        stats, *_ = _pass(x, linear_weight, linear_bias, t, weight, plan, None, (False,) * 3, tw)
        loss = core.reduce_rows(stats[core.LOSS], scale, opts)
    loss = loss.reshape(out_shape) if opts.per_row else loss
    if not extras:
        return loss
    if scale is None and opts.mean:
        scale = _mean_gradient_scale(t, weight, opts, x, tw)
    return loss, core.public_stats(stats, scale, opts, out_shape)


class LinearCrossEntropyLoss(nn.Module):
    """``torch.nn.LinearCrossEntropyLoss`` on the chunked fused path; see linear_cross_entropy.

    Like torch's module it owns the projection (``self.linear``, an ``nn.Linear(in_features,
    num_classes)``) and ``forward(input, target)`` returns the loss of ``self.linear(input)``.
    To put it on an existing LM head, use :meth:`from_linear`, which shares that module.

    Shapes: input (D,), (N, D) or (..., D); target ``input.shape[:-1]`` class indices; output a
    scalar, or the target's shape for reduction="none".
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        accumulation: Accumulation = "float32",
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        loss_args = (ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss)
        call = CallOptions(*loss_args, chunk_size=chunk_size, accumulation=accumulation)
        opts, chunk_size, accumulation = _check_options("LinearCrossEntropyLoss", call)
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.reduction = opts.reduction
        self.ignore_index = opts.ignore_index
        self.label_smoothing = opts.label_smoothing
        self.chunk_size = chunk_size
        self.accumulation = accumulation
        self.logit_scale = opts.logit_scale
        self.softcap = opts.softcap
        self.z_loss = opts.z_loss
        self.return_stats = bool(return_stats)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> LinearCrossEntropyLoss:
        """A loss module sharing an existing projection (e.g. ``model.lm_head``), not copying it.

        Args:
            linear: the ``nn.Linear(D, V)`` whose weight (and bias) produce the logits.
            **kwargs: the keyword options of ``__init__`` (reduction, weight, ignore_index, ...).
        """
        kwargs.setdefault("bias", linear.bias is not None)
        module = cls(
            linear.in_features,
            linear.out_features,
            device="meta",
            dtype=linear.weight.dtype,
            **kwargs,
        )
        module.linear = linear
        return module

    def forward(
        self, input: Tensor, target: Tensor, token_weight: Tensor | None = None
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        """The loss of ``self.linear(input)`` (and stats with ``return_stats``); errors name
        ``LinearCrossEntropyLoss``."""
        head = (input, self.linear.weight, target, self.linear.bias, self.weight, token_weight)
        return _linear_cross_entropy("LinearCrossEntropyLoss", *head, CallOptions.of(self))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"chunk_size={self.chunk_size}, accumulation={self.accumulation!r}, "
            f"logit_scale={self.logit_scale}, softcap={self.softcap}, z_loss={self.z_loss}, "
            f"return_stats={self.return_stats}"
        )
