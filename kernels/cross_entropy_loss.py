"""``cross_entropy`` and ``CrossEntropyLoss``: torch's signatures on the fused row contract.

This file holds the argument checks, the autograd Function (eager mode) and the custom ops
(what ``torch.compile`` sees); the computation is ``core.py`` on a backend of ``backends``.

Scalar reductions compute the loss AND the gradient in one pass over the logits; backward only
multiplies the saved gradient by ``grad_output`` (nothing at all, without a host sync, when it
is exactly 1). ``reduction="none"`` computes the loss and each row's log-sum-exp in forward; its
backward writes the gradient once, with each row's upstream factor folded in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import backends, core, func_transforms, index_check
from .core import CrossEntropyStats
from .options import (
    CallOptions,
    LossOptions,
    accumulation_dtype,
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

__all__ = ["CrossEntropyLoss", "CrossEntropyStats", "cross_entropy"]

_WHO = "cross_entropy"


def _no_double_backward(who: str) -> None:
    """Backward runs with grad mode on only under ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fusedce.{who}: double backward (create_graph=True, e.g. for a gradient penalty) "
            "is not supported; use torch.nn.functional.cross_entropy for that loss term"
        )


def _check_and_flatten(
    who: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, tuple[int, ...], Tensor | None]:
    """Checks the tensors; returns (logits (M, C), target (M,) or (M, C), weight, out shape,
    token weights (M,) or None); ``who`` names the function the user called."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: input and target must be tensors")
    if not input.is_floating_point():
        raise TypeError(f"{who}: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: input must have shape (C,), (N, C) or (N, C, d1, ...)")
    if target.device != input.device:
        raise ValueError(f"{who}: target is on {target.device} but input is on {input.device}")
    class_dim = 0 if input.dim() == 1 else 1
    C = input.shape[class_dim]
    if C == 0:
        raise ValueError(f"{who}: input has 0 classes")
    check_class_weight(who, weight, C, input.device)
    weight = prepare_class_weight(weight, input.dtype)

    soft = target.shape == input.shape
    if soft:
        if not target.is_floating_point():
            raise TypeError(
                f"{who}: a target of the input's shape holds class probabilities and must be "
                f"floating point, got {target.dtype}"
            )
        if opts.ignore_index >= 0:
            raise ValueError(f"{who}: ignore_index is not supported for probability targets")
    else:
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if class_dim else ()
        if tuple(target.shape) != expected:
            raise ValueError(
                f"{who}: target of shape {tuple(target.shape)} does not fit input of shape "
                f"{tuple(input.shape)}: expected class indices of shape {expected} or "
                f"probabilities of shape {tuple(input.shape)}"
            )
        check_class_index_dtype(who, target)
        target = index_target_for_kernels(target, opts.ignore_index)

    out_shape = tuple(input.shape[:class_dim]) + tuple(input.shape[class_dim + 1 :])
    check_token_weight(who, token_weight, out_shape, input.device)
    token_weight = prepare_token_weight(token_weight, input.dtype)
    if input.dim() == 1:
        logits, target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:  # (N, C, d1, ...) -> (N * d1 * ..., C): the class dimension last
        logits = input.movedim(1, -1).reshape(-1, C)
        target = target.movedim(1, -1).reshape(-1, C) if soft else target.reshape(-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if soft and target.stride(-1) != 1:
        target = target.contiguous()
    return logits, target, weight, out_shape, token_weight


# --------------------------------------------------------------------------------------------
# Eager autograd
# --------------------------------------------------------------------------------------------


class _FusedCrossEntropy(torch.autograd.Function):
    """Scalar reductions: the gradient computed in forward, scaled in backward. "none": forward
    keeps each row's lse, backward writes the gradient once with the per-row factors."""

    @staticmethod
    def forward(ctx, logits, target, weight, opts, inplace, token_weight, extras, who):  # type: ignore[override]
        target_grad = ctx.needs_input_grad[1]
        # The fused gradient only when the logits want one (a target alone needs none).
        grad_now = not opts.per_row and ctx.needs_input_grad[0]
        # The logits are needed in backward for the "none" gradient or the target's gradient:
        # the fused gradient may then not overwrite them.
        overwrite = inplace and grad_now and not target_grad
        with index_check.reporting_as(who):  # the deferred check keeps the name
            fwd = core.forward(
                logits,
                target,
                weight,
                opts,
                grad_now,
                inplace=overwrite,
                defer_check=True,
                token_weight=token_weight,
                extras=extras,
            )
        if overwrite:
            # The logits now hold the gradient: let autograd catch anyone who saved them.
            torch.autograd.graph.increment_version(logits)
        keep_logits = opts.per_row or target_grad
        ctx.save_for_backward(logits if keep_logits else None, target, weight, token_weight)
        ctx.opts, ctx.inplace, ctx.who = opts, inplace, who
        ctx.stats, ctx.scale, ctx.grad = fwd.stats, fwd.scale, fwd.grad
        ctx.pending_check, ctx.consumed = fwd.pending_check, False
        if not extras:
            return fwd.loss, None
        # The stats are a second, non-differentiable output; "none" returns a copy of stats[LOSS]
        # so that the two outputs do not alias.
        ctx.mark_non_differentiable(fwd.stats)
        return (fwd.loss.clone() if opts.per_row else fwd.loss), fwd.stats

    @staticmethod
    def backward(ctx, grad_output, _grad_stats=None):  # type: ignore[override]
        _no_double_backward(ctx.who)
        if ctx.pending_check is not None:
            ctx.pending_check.resolve()
        if ctx.consumed:
            raise RuntimeError(
                f"fusedce.{ctx.who}: backward ran twice through the same graph "
                "(retain_graph=True). The fused gradient is consumed by the first backward; "
                "compute the loss again for a second backward."
            )
        logits, target, weight, token_weight = ctx.saved_tensors
        opts = ctx.opts
        grad_logits = grad_target = None
        if ctx.needs_input_grad[1]:
            factor = grad_output.reshape(-1) if opts.per_row else grad_output * ctx.scale
            grad_target = core.probability_target_grad(
                logits, ctx.stats, weight, opts, factor, token_weight
            ).to(target.dtype)
        if ctx.needs_input_grad[0]:
            if opts.per_row:
                out = logits if ctx.inplace else None
                grad_logits = core.gradient_from_stats(
                    logits, target, weight, opts, ctx.stats, grad_output, out, token_weight
                )
            else:
                grad_logits = ctx.grad
                core.apply_upstream_grad_(grad_logits, grad_output)
        # Scalar reductions hand their one gradient buffer over; "none" in place reuses logits.
        ctx.consumed = not opts.per_row or ctx.inplace
        ctx.grad = None
        return grad_logits, grad_target, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (backward out of place: graphs may reuse it).
# --------------------------------------------------------------------------------------------


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


def _kernel_layout(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    token_weight: Tensor | None,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The layout the backends read (unit stride along the classes, contiguous weights): the
    custom ops are callable directly, with any strides. No copy for what ``cross_entropy``
    passes them."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if target.dim() == 2:
        if target.stride(-1) != 1:
            target = target.contiguous()
    else:
        target = index_target_for_kernels(target, ignore_index)
    weight = prepare_class_weight(weight, logits.dtype)
    token_weight = prepare_token_weight(token_weight, logits.dtype)
    return logits, target, weight, token_weight


@torch.library.custom_op("fusedce::cross_entropy", mutates_args=())
def _cross_entropy_op(
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
    who: str = _WHO,
    float_options: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, gradient of the reduced loss or an empty tensor, (STAT_ROWS or EXTRA_STAT_ROWS, M)
    per-row stats); every output contiguous, whatever the inputs' strides. ``who``: the public
    function the error messages name.

    ``float_options``: the four float options as ``options.float_options_tensor`` (the floats
    are then placeholders), for values that change between compiled calls."""
    check_token_weight_values(who, token_weight)
    opts = from_op_args(
        ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, float_options
    )
    logits, target, weight, token_weight = _kernel_layout(
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


@_cross_entropy_op.register_fake
def _(*args, **kwargs):
    a = op_arguments(_cross_entropy_op, args, kwargs)
    logits, reduction, grad_now, extras = a["logits"], a["reduction"], a["grad_now"], a["extras"]
    # new_empty: contiguous, as every output of the real op (empty_like would keep the strides
    # of a transposed input).
    M = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((M,) if reduction == "none" else (), dtype=acc)
    grad = logits.new_empty(logits.shape if grad_now else (0,))
    rows = core.EXTRA_STAT_ROWS if extras else core.STAT_ROWS
    return loss, grad, logits.new_empty((rows, M), dtype=acc)


@torch.library.custom_op("fusedce::cross_entropy_grad", mutates_args=())
def _cross_entropy_grad_op(
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
    opts = from_op_args(
        ignore_index, label_smoothing, "none", logit_scale, softcap, z_loss, float_options
    )
    logits, target, weight, token_weight = _kernel_layout(
        logits, target, weight, token_weight, ignore_index
    )
    stats = stats.contiguous()
    return core.gradient_from_stats(
        logits, target, weight, opts, stats, row_factor, token_weight=token_weight
    )


@_cross_entropy_grad_op.register_fake
def _(logits, *_args, **_kwargs):
    return logits.new_empty(logits.shape)  # contiguous, as the real op's


def _op_setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, reduction, _ = inputs[:7]
    logit_scale, softcap, z_loss, token_weight, _, who, float_options = inputs[7:]
    # With float_options the four floats are placeholders: the gradient op reads the tensor
    # (the target's gradient, which reads opts here, never takes that route: see cross_entropy).
    ctx.opts = from_op_args(
        ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, None
    )
    ctx.who = who
    ctx.float_options = float_options
    # The gradient op's options: the forward's arguments, placeholders and tensor included.
    ctx.grad_op_args = (ignore_index, label_smoothing, logit_scale, softcap, z_loss)
    keep_logits = reduction == "none" or target.requires_grad
    ctx.save_for_backward(
        logits if keep_logits else None, target, weight, output[1], output[2], token_weight
    )


def _op_backward(ctx, grad_loss, _grad_of_grad, _grad_of_stats):
    _no_double_backward(ctx.who)
    logits, target, weight, grad, stats, token_weight = ctx.saved_tensors
    opts = ctx.opts
    grad_logits = grad_target = None
    if ctx.needs_input_grad[1]:
        # The floats of opts are read here: never placeholders (see _float_options_as_tensor).
        assert ctx.float_options is None, "fusedce: target gradient with tensor float options"
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
            grad_logits = _cross_entropy_grad_op(
                logits,
                target,
                weight,
                stats,
                grad_loss,
                *ctx.grad_op_args,
                token_weight,
                ctx.float_options,
            )
        else:
            grad_logits = grad * grad_loss.to(grad.dtype)
    return (grad_logits, grad_target) + (None,) * 12


_cross_entropy_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy between logits and targets: ``torch.nn.functional.cross_entropy``, fused.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ..., dk); float32, float16, bfloat16
            (or float64, which takes the torch backend); any strides.
        target: class indices (int64, int32 or uint8) of shape (), (N,) or (N, d1, ..., dk), or
            class probabilities of the input's shape (soft targets: H(P, Q) = -sum_x P(x)
            log Q(x)); probabilities may require grad (their gradient is computed as torch's).
        weight: optional (C,) class weights (not differentiable, as in torch).
        ignore_index: class index that contributes neither loss nor gradient (class indices);
            None means -100.
        reduction: "none" (per-element loss of the target's shape), "mean" or "sum".
        label_smoothing: amount in [0, 1] of uniform smoothing of the target distribution.
        inplace_backward: write the gradient into the logits' storage instead of a new buffer:
            saves one logits-sized allocation, but the logits are overwritten (by forward for
            "mean"/"sum", by backward for "none"): nothing may read them afterwards (autograd
            raises if a saved tensor was overwritten). Only where the (N, C) view of the input
            is contiguous and the input is not a leaf that requires grad; not while the target
            requires grad (its gradient reads the logits).
        logit_scale: s > 0; the loss sees z = s * x (a logit scale; 1 / T for a temperature T).
        softcap: c > 0 or None; then z = c * tanh(z / c), after the scale.
        z_loss: lambda >= 0; each non-ignored element adds lambda * logsumexp(z)**2.
        token_weight: optional float tensor of the per-element loss shape ((), (N,) or
            (N, d1, ..., dk)), finite and >= 0, not differentiated: element i contributes
            t_i * (l_i + lambda * lse_i**2); "mean" divides by sum_i t_i * w_{y_i} over the
            non-ignored elements (sum_i t_i for probabilities).
        return_stats: also return a ``CrossEntropyStats`` (z_loss part, lse, entropy,
            correct), computed in the same pass.
        process_group: a ``torch.distributed.ProcessGroup`` over which the class dimension is
            split: ``input`` is then this rank's slice of the logits and ``target`` holds global
            class indices; see ``fusedce.vocab_parallel.vocab_parallel_cross_entropy`` (also
            taken for a ``DTensor`` input sharded on the class dimension, without a group).
            None (the default) is the unsharded loss; so is ``torch.distributed.group.WORLD``
            before ``init_process_group``, which is None then.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or the shape above for "none";
        with ``return_stats`` the tuple ``(loss, stats)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or options (``logit_scale <= 0``,
            ``softcap <= 0``, ``z_loss < 0``, token weights of the wrong shape, dtype or device,
            negative or non-finite; a ``process_group`` that is not a ProcessGroup). Every
            message starts with the name of the function called (``cross_entropy``, or
            ``CrossEntropyLoss`` for the module).
        IndexError: a class index outside [0, C) other than ignore_index (see
            ``set_target_check``; on CUDA raised from backward when a gradient is wanted).
        RuntimeError: ``weight.requires_grad`` or ``token_weight.requires_grad``;
            ``inplace_backward`` on a leaf that requires
            grad; double backward (``create_graph=True``); a ``process_group`` while
            ``torch.distributed`` is not initialised.

    Deviations from torch: reduction="mean" with nothing to average (every target ignored, or an
    empty batch) gives 0.0 and a zero gradient instead of NaN; a probability of 0 times a logit
    of -inf contributes 0 (its limit), not NaN. Calling backward twice through the same graph
    (retain_graph=True) raises in eager mode for "mean" and "sum": the first backward consumes
    the fused gradient.
    """
    loss_args = (ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss)
    call = CallOptions(*loss_args, return_stats, inplace_backward)
    return _cross_entropy(_WHO, input, target, weight, token_weight, call, process_group)


def _cross_entropy(
    who: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    token_weight: Tensor | None,
    call: CallOptions,
    process_group: object = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``cross_entropy`` for the public function ``who`` (``cross_entropy``,
    ``CrossEntropyLoss``, or the vocabulary-parallel function on one rank): every error names
    it."""
    compiling = torch.compiler.is_compiling()
    if sharded.wants_vocab_parallel(input, process_group):
        if func_transforms.active():
            raise func_transforms.refuse_sharded(who)
        sharded.refuse_unsharded_options(who, inplace_backward=call.inplace_backward)
        return sharded.call_cross_entropy(
            who, input, target, weight, token_weight, call, process_group, plain=_cross_entropy
        )
    opts = call.loss_options(who)
    inplace_backward = call.inplace_backward
    logits, target, weight, out_shape, tw = _check_and_flatten(
        who, input, target, weight, opts, token_weight
    )
    extras = bool(call.return_stats)
    if func_transforms.active():
        # torch.func.grad / vmap / jacrev ...: differentiable torch ops, same semantics.
        return func_transforms.cross_entropy(
            logits, target, weight, opts, tw, out_shape, extras, who
        )
    grad_enabled = torch.is_grad_enabled()
    need_grad = grad_enabled and input.requires_grad
    target_grad = grad_enabled and target.requires_grad
    scale = None
    shortcut = None if compiling else backends.small_call(logits)
    if shortcut is not None:
        # The backend may take the whole call (small plain CPU calls: torch's F.cross_entropy).
        out = shortcut(
            logits, target, weight, opts, tw, out_shape, extras, inplace_backward, target_grad, who
        )
        if out is not None:
            return out
    if compiling:
        grad_now = need_grad and not opts.per_row
        op_args = to_op_args(opts, _float_options_as_tensor(logits, opts, target_grad))
        rest = {"grad_now": grad_now, "token_weight": tw, "extras": extras, "who": who}
        loss, _, stats = _cross_entropy_op(logits, target, weight, **rest, **op_args)
    elif need_grad or target_grad:
        if inplace_backward and input.is_leaf and input.requires_grad:
            raise RuntimeError(
                f"{who}: inplace_backward=True would overwrite a leaf tensor that requires "
                "grad; pass a non-leaf tensor (e.g. the output of the last layer) or "
                "inplace_backward=False"
            )
        inplace = inplace_backward and need_grad and logits.is_contiguous()
        loss, stats = _FusedCrossEntropy.apply(
            logits, target, weight, opts, inplace, tw, extras, who
        )
    else:
        with index_check.reporting_as(who):
            fwd = core.forward(logits, target, weight, opts, False, token_weight=tw, extras=extras)
        loss, stats, scale = fwd.loss, fwd.stats, fwd.scale
    loss = loss.reshape(out_shape) if opts.per_row else loss
    if not extras:
        return loss
    if scale is None and opts.mean:
        acc = accumulation_dtype(logits.dtype)
        scale = core.inverse_normaliser(
            core.mean_normaliser(target, weight, opts.ignore_index, acc, tw)
        )
    return loss, core.public_stats(stats, scale, opts, out_shape)


def _float_options_as_tensor(logits: Tensor, opts: LossOptions, target_grad: bool) -> bool:
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


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` on the fused kernel; see :func:`cross_entropy`.

    Shapes: input (C,), (N, C) or (N, C, d1, ..., dk); target (), (N,) or (N, d1, ..., dk) class
    indices, or probabilities of the input's shape; output a scalar, or the target's shape for
    reduction="none".
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        inplace_backward: bool = False,
        *,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        call = CallOptions(ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss)
        opts = call.loss_options("CrossEntropyLoss")
        self.register_buffer("weight", weight)
        self.ignore_index = opts.ignore_index
        self.reduction = opts.reduction
        self.label_smoothing = opts.label_smoothing
        self.inplace_backward = inplace_backward
        self.logit_scale = opts.logit_scale
        self.softcap = opts.softcap
        self.z_loss = opts.z_loss
        self.return_stats = bool(return_stats)

    def forward(
        self, input: Tensor, target: Tensor, token_weight: Tensor | None = None
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        """The loss (and stats with ``return_stats``); ``token_weight`` per element, or None.
        Errors name ``CrossEntropyLoss``."""
        call = CallOptions.of(self)
        return _cross_entropy("CrossEntropyLoss", input, target, self.weight, token_weight, call)

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, inplace_backward={self.inplace_backward}, "
            f"logit_scale={self.logit_scale}, softcap={self.softcap}, z_loss={self.z_loss}, "
            f"return_stats={self.return_stats}"
        )
