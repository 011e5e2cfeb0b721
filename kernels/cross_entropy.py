"""Fused cross-entropy: the drop-in functional API, the nn.Module, autograd and dispatch.

``cross_entropy`` has the signature and semantics of ``torch.nn.functional.cross_entropy``. The
forward pass computes the loss AND the gradient with respect to the logits in one launch; the
backward pass only multiplies that gradient by ``grad_output`` (and skips even that, without a
host sync, when ``grad_output`` is exactly 1).

Dispatch (decided per call):
    * CUDA tensors -> the Triton kernel (``kernels/triton_cross_entropy.py``);
    * CPU tensors -> the torch fallback (``kernels/torch_cross_entropy.py``), or the Triton kernel
      through Triton's interpreter when the environment variable ``TRITON_INTERPRET=1`` is set;
    * float64 anywhere -> the torch fallback, computed in float64.

Under ``torch.compile`` the call goes through the custom op ``torch.ops.fusedce.cross_entropy``,
so graphs compile with ``fullgraph=True`` and no graph break.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .torch_cross_entropy import cross_entropy_fwd_bwd_torch

try:  # Triton is optional: without it every call takes the torch fallback.
    from .triton_cross_entropy import (
        cross_entropy_fwd_bwd_triton,
        prologue_triton,
        reduce_triton,
        scale_rows_triton,
    )

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

# Experimental, opt-in: rows staged in shared memory (Gluon, Hopper); docs/KERNEL_NOTES.md.
_GLUON = False
if HAS_TRITON and os.environ.get("FUSEDCE_GLUON", "0") == "1":
    try:
        from . import gluon_cross_entropy

        _GLUON = True
    except ImportError:  # a triton without the Gluon dialect
        _GLUON = False

__all__ = ["CrossEntropyLoss", "cross_entropy", "set_target_check"]

_REDUCTIONS = ("none", "mean", "sum")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Read once: Triton itself decides at import time whether @triton.jit kernels are interpreted.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CHECK_TARGETS = os.environ.get("FUSEDCE_CHECK_TARGETS", "1") != "0"


def set_target_check(enabled: bool) -> None:
    """Turns the class-index range check on or off (default on; env ``FUSEDCE_CHECK_TARGETS=0``).

    The check raises ``IndexError`` for a class index outside [0, C) other than ``ignore_index``.
    On CUDA one tiny kernel counts the bad indices (fused with the mean normaliser). When a
    gradient is wanted, the count travels to pinned host memory asynchronously and is read when
    backward starts: the exception comes from ``loss.backward()`` and forward never stalls the
    host. Without a gradient (validation) it is read at once: one host sync. Switch the check
    off for CUDA-graph capture or the last microseconds. With it off (or before backward) an
    out-of-range index still never reads out of bounds: its row's loss and gradient are NaN.
    """
    global _CHECK_TARGETS
    _CHECK_TARGETS = bool(enabled)


def uses_triton(t: Tensor) -> bool:
    """Whether a tensor of this device and dtype runs the Triton kernel (vs the torch fallback)."""
    if not HAS_TRITON or t.dtype not in _KERNEL_DTYPES:
        return False
    return t.is_cuda or (_INTERPRET and t.device.type == "cpu")


class _Options(NamedTuple):
    ignore_index: int
    label_smoothing: float
    reduction: str


# --------------------------------------------------------------------------------------------
# Core: per-row loss + scaled gradient for a 2-D (M, V) view. Also used by linear_cross_entropy.
# --------------------------------------------------------------------------------------------


def check_class_indices(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises IndexError if a class index is outside [0, num_classes) and not ignore_index."""
    if not _CHECK_TARGETS or target.dim() != 1 or target.numel() == 0:
        return
    if bool(_count_bad_indices(target, num_classes, ignore_index)):  # a host sync on CUDA
        _raise_bad_index(target, num_classes, ignore_index)


def _bad_index_mask(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def _count_bad_indices(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """() int32 device scalar: class indices outside [0, num_classes) other than ignore_index."""
    return _bad_index_mask(target, num_classes, ignore_index).sum(dtype=torch.int32)


def _raise_bad_index(target: Tensor, num_classes: int, ignore_index: int) -> None:
    value = int(target[_bad_index_mask(target, num_classes, ignore_index)][0])
    raise IndexError(
        f"cross_entropy: target class index {value} is out of bounds for {num_classes} "
        f"classes (valid: 0..{num_classes - 1}, or ignore_index={ignore_index})"
    )


class _DeferredIndexCheck:
    """The bad-index count on its way to the host, read when the backward pass starts.

    Reading it in forward would stall the host until the GPU reaches this call and leave the
    GPU idle behind it; by backward the count has normally long arrived. Until then the loss
    and gradient rows of bad indices are NaN, so nothing is silently wrong in between.
    """

    def __init__(self, n_bad: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> None:
        self._host = torch.empty((), dtype=n_bad.dtype, pin_memory=True)
        self._host.copy_(n_bad, non_blocking=True)
        self._arrived = torch.cuda.Event()
        self._arrived.record()
        self._args = (target, num_classes, ignore_index)

    def resolve(self) -> None:
        """Raises IndexError if the forward pass saw an out-of-range class index."""
        if not self._arrived.query():  # normally arrived long ago: no wait at all
            self._arrived.synchronize()
        if int(self._host):
            _raise_bad_index(*self._args)


def mean_denominator(
    target: Tensor, weight: Tensor | None, ignore_index: int, num_rows: int
) -> Tensor:
    """torch's normaliser of reduction='mean', as a float32 device scalar (no host sync).

    Class indices: sum of the weights of the non-ignored targets (their count without weights).
    Probabilities: the number of rows.
    """
    if target.dim() == 2:
        return torch.full((), float(num_rows), dtype=torch.float32, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=torch.float32)
    # Clamp so that an unchecked bad index cannot gather out of bounds.
    idx = target.clamp(0, weight.numel() - 1)
    return torch.where(valid, weight.float()[idx], 0.0).sum(dtype=torch.float32)


def loss_and_grad_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    grad: Tensor | None,
    scale: Tensor | None,
) -> Tensor:
    """Per-row loss of a (M, V) view and, if ``grad`` is given, ``scale * d loss / d logits``.

    Args:
        logits: (M, V) float tensor with unit stride along V.
        target: (M,) class indices or (M, V) probabilities with unit stride along V.
        weight: (V,) float32 class weights or None.
        ignore_index: ignored class index (class-index targets).
        label_smoothing: in [0, 1].
        grad: (M, V) output buffer with unit stride along V, may be ``logits`` itself; or None.
        scale: () float32 scalar on the logits' device; required with ``grad``.

    Returns:
        (M,) per-row loss, float32 (float64 for float64 logits), not normalised.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss_rows = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    if _GLUON and gluon_cross_entropy.supports(logits, target, weight, grad):
        run = gluon_cross_entropy.cross_entropy_fwd_bwd_gluon
    elif uses_triton(logits):
        run = cross_entropy_fwd_bwd_triton
    else:
        run = cross_entropy_fwd_bwd_torch
    run(logits, target, weight, ignore_index, label_smoothing, loss_rows, grad, scale)
    return loss_rows


# Up to this many rows, one program does the prologue (scale + index check) and the final sum in
# a single launch each; past it, torch's multi-block reductions finish sooner than one program
# looping over all rows. A guess to be tuned on the GPU (docs/KERNEL_NOTES.md, section 3).
ONE_PROGRAM_ROWS = 16384


def _grad_scale(
    logits: Tensor, target: Tensor, weight: Tensor | None, opts: _Options, defer: bool = False
) -> tuple[Tensor, _DeferredIndexCheck | None]:
    """The gradient scale (1 / mean normaliser, or 1), after checking the class indices.

    With ``defer`` (CUDA, gradient wanted) the check is returned to be resolved in backward
    instead of reading the count back now.
    """
    M, V = logits.shape
    mean = opts.reduction == "mean"
    check = _CHECK_TARGETS and target.dim() == 1
    if uses_triton(logits) and M <= ONE_PROGRAM_ROWS:
        # One tiny launch computes both the scale and the bad-index count.
        scale, n_bad = prologue_triton(target, weight, opts.ignore_index, M, V, mean, check)
    else:
        n_bad = _count_bad_indices(target, V, opts.ignore_index) if check else None
        if mean:
            denom = mean_denominator(target, weight, opts.ignore_index, M)
            # Documented deviation from torch: nothing to average (all ignored, M == 0) gives 0.
            scale = torch.where(denom > 0, 1.0 / denom, 0.0)
        else:
            scale = torch.ones((), dtype=torch.float32, device=logits.device)
    if n_bad is None:
        return scale, None
    if defer and logits.is_cuda:
        return scale, _DeferredIndexCheck(n_bad, target, V, opts.ignore_index)
    if bool(n_bad):  # a host sync on CUDA (calls without a gradient); see set_target_check
        _raise_bad_index(target, V, opts.ignore_index)
    return scale, None


def _forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: _Options,
    need_grad: bool,
    inplace: bool = False,
    defer_check: bool = False,
) -> tuple[Tensor, Tensor | None, _DeferredIndexCheck | None]:
    """Loss (reduced as asked), the gradient of the reduced loss for a (M, V) view, and the
    class-index check still to resolve (``defer_check`` on CUDA), or None."""
    scale, pending = _grad_scale(logits, target, weight, opts, defer_check)
    grad = None
    if need_grad:
        grad = (
            logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        )
    loss_rows = loss_and_grad_rows(
        logits, target, weight, opts.ignore_index, opts.label_smoothing, grad, scale
    )
    if opts.reduction == "none":
        return loss_rows, grad, pending
    mean = opts.reduction == "mean"
    if uses_triton(logits) and logits.shape[0] <= ONE_PROGRAM_ROWS:
        return reduce_triton(loss_rows, scale, mean), grad, pending
    loss = loss_rows.sum()
    return (loss * scale.to(loss.dtype) if mean else loss), grad, pending


def _scale_in_place(grad: Tensor, grad_output: Tensor, per_row: bool) -> None:
    """grad *= grad_output (a scalar, or one factor per row), in place."""
    factor = grad_output.reshape(-1) if per_row else grad_output.reshape(())
    if uses_triton(grad):
        scale_rows_triton(grad, factor.float().contiguous())
    elif per_row:
        grad.mul_(factor[:, None].to(grad.dtype))
    elif bool(factor != 1):  # CPU: reading the value costs nothing
        grad.mul_(factor.to(grad.dtype))


# --------------------------------------------------------------------------------------------
# Eager autograd: backward scales the saved gradient in place (no extra memory, no host sync).
# --------------------------------------------------------------------------------------------


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, opts, inplace):  # type: ignore[override]
        loss, grad, ctx.pending_check = _forward(
            logits, target, weight, opts, need_grad=True, inplace=inplace, defer_check=True
        )
        if inplace:
            # The logits now hold the gradient: let autograd catch anyone who saved them.
            torch.autograd.graph.increment_version(logits)
        ctx.grad = grad
        ctx.per_row = opts.reduction == "none"
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.pending_check is not None:
            ctx.pending_check.resolve()
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "kernels.cross_entropy: backward ran twice through the same graph "
                "(retain_graph=True). The fused gradient is consumed by the first backward; "
                "compute the loss again for a second backward."
            )
        ctx.grad = None
        _scale_in_place(grad, grad_output, ctx.per_row)
        return grad, None, None, None, None


# --------------------------------------------------------------------------------------------
# torch.library custom op: what torch.compile sees (backward out of place: graphs may reuse it).
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedce::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    opts = _Options(ignore_index, label_smoothing, reduction)
    loss, grad, _ = _forward(logits, target, weight, opts, need_grad)
    if grad is None:
        grad = logits.new_empty((0,))
    return loss, grad


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, need_grad):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shape = (logits.shape[0],) if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=acc)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else None
    return loss, grad if grad is not None else logits.new_empty((0,))


def _op_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.save_for_backward(output[1])


def _op_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    factor = grad_loss[:, None] if ctx.reduction == "none" else grad_loss
    return grad * factor.to(grad.dtype), None, None, None, None, None, None


_cross_entropy_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_and_flatten(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor | None, tuple[int, ...]]:
    """Checks the arguments; returns (logits (M, C), target (M,)/(M, C), weight, out shape)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("cross_entropy: input and target must be tensors")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not input.is_floating_point():
        raise TypeError(f"cross_entropy: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have shape (C,), (N, C) or (N, C, d1, ...)")
    if target.device != input.device:
        raise ValueError(
            f"cross_entropy: target is on {target.device} but input is on {input.device}"
        )
    class_dim = 0 if input.dim() == 1 else 1
    C = input.shape[class_dim]
    if C == 0:
        raise ValueError("cross_entropy: input has 0 classes")
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.numel() != C:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(
                f"cross_entropy: weight must be a 1-D tensor of {C} class weights, got {shape}"
            )
        if not weight.is_floating_point():
            raise TypeError(f"cross_entropy: weight must be floating point, got {weight.dtype}")
        if weight.device != input.device:
            raise ValueError(
                f"cross_entropy: weight is on {weight.device}, input on {input.device}"
            )
        weight = weight.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
        weight = weight.contiguous()

    soft = target.shape == input.shape
    if soft:
        if not target.is_floating_point():
            raise TypeError(
                "cross_entropy: a target of the input's shape holds class probabilities and must "
                f"be floating point, got {target.dtype}"
            )
        if ignore_index >= 0:
            raise ValueError("cross_entropy: ignore_index is not supported for probability targets")
        if target.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "cross_entropy: no gradient with respect to probability targets; detach the target"
            )
    else:
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if class_dim else ()
        if tuple(target.shape) != expected:
            raise ValueError(
                f"cross_entropy: target of shape {tuple(target.shape)} does not fit input of shape "
                f"{tuple(input.shape)}: expected class indices of shape {expected} or "
                f"probabilities of shape {tuple(input.shape)}"
            )
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"cross_entropy: class-index targets must be int64 or int32, got {target.dtype}"
            )

    out_shape = (
        tuple(target.shape)
        if not soft
        else tuple(input.shape[:class_dim]) + tuple(input.shape[class_dim + 1 :])
    )
    if input.dim() == 1:
        logits = input.unsqueeze(0)
        target = target.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:  # (N, C, d1, ...) -> (N * d1 * ..., C): the class dimension last
        logits = input.movedim(1, -1).reshape(-1, C)
        target = target.movedim(1, -1).reshape(-1, C) if soft else target.reshape(-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if soft and target.stride(-1) != 1:
        target = target.contiguous()
    return logits, target, weight, out_shape


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
) -> Tensor:
    """Cross-entropy between logits and targets: ``torch.nn.functional.cross_entropy``, fused.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ..., dk); float32, float16, bfloat16
            (or float64, which takes the torch fallback); any strides.
        target: class indices (int64 or int32) of shape (), (N,) or (N, d1, ..., dk), or class
            probabilities of the input's shape (soft targets: H(P, Q) = -sum_x P(x) log Q(x)).
        weight: optional (C,) class weights.
        ignore_index: class index that contributes neither loss nor gradient (class indices).
        reduction: "none" (per-element loss of the target's shape), "mean" or "sum".
        label_smoothing: amount in [0, 1] of uniform smoothing of the target distribution.
        inplace_backward: write the gradient into the logits' storage instead of a new buffer.
            Saves one logits-sized allocation, but the logits are overwritten by the forward pass:
            nothing may read them afterwards (autograd raises if a saved tensor was overwritten).
            Only where the (N, C) view of the input is contiguous; otherwise a new buffer.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or the shape above for "none".

    Deviations from torch: reduction="mean" with nothing to average (every target ignored, or an
    empty batch) gives 0.0 and a zero gradient instead of NaN; a probability of 0 times a logit
    of -inf contributes 0 (its limit), not NaN. Calling backward twice through the same graph
    (retain_graph=True) raises in eager mode: the first backward consumes the fused gradient.
    """
    logits, target, weight, out_shape = _check_and_flatten(
        input, target, weight, ignore_index, reduction, label_smoothing
    )
    need_grad = torch.is_grad_enabled() and input.requires_grad
    if torch.compiler.is_compiling():
        loss, _ = _cross_entropy_op(
            logits, target, weight, ignore_index, float(label_smoothing), reduction, need_grad
        )
    else:
        opts = _Options(ignore_index, float(label_smoothing), reduction)
        if need_grad:
            inplace = inplace_backward and logits.is_contiguous()
            loss = _FusedCrossEntropy.apply(logits, target, weight, opts, inplace)
        else:
            loss, _, _ = _forward(logits, target, weight, opts, need_grad=False)
    return loss.reshape(out_shape) if reduction == "none" else loss


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
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"CrossEntropyLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
            )
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(
                f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}"
            )
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, inplace_backward={self.inplace_backward}"
        )
