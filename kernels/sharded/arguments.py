"""The checks of one rank's arguments to the sharded losses, before the rank agreement.

Each rank checks its own tensors (shapes, dtypes, devices, class weights, the linear head's
weight and bias) and flattens the cross-entropy's logits to (M, V_r); an error raised here
travels to every rank through the metadata exchange (``agreement._agree``). ``_CE`` / ``_LCE``
are the names of the vocabulary-parallel entry points, which the messages use to name the
arguments as those functions call them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import check_class_index_dtype, index_target_for_kernels
from .agreement import _Shard
from .slices import _KEY_CLASS_BITS

_CE = "vocab_parallel_cross_entropy"
_LCE = "vocab_parallel_linear_cross_entropy"


def _check_weight(who: str, weight: object, device: torch.device) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{who}: weight must be a 1-D tensor of the V class weights, got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"{who}: weight must be floating point, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"{who}: weight is on {weight.device} but input is on {device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{who}: the loss is not differentiable with respect to the class weights "
            "(weight.requires_grad=True); pass weight.detach()"
        )


# --------------------------------------------------------------------------------------------
# The local math on a slice
# --------------------------------------------------------------------------------------------


def _flatten_ce(
    who: str, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, tuple[int, ...], bool]:
    """Checks one rank's tensors; returns (logits (M, V_r), target (M,) or (M, V_r), output
    shape, whether the targets are probabilities)."""
    name = "local_logits" if who == _CE else "input"  # the argument's name in ``who``
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: {name} and target must be tensors")
    if not input.is_floating_point():
        raise TypeError(f"{who}: {name} must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: {name} must have shape (C_r,), (N, C_r) or (N, C_r, ...)")
    if target.device != input.device:
        raise ValueError(f"{who}: target is on {target.device} but {name} is on {input.device}")
    _check_weight(who, weight, input.device)
    class_dim = 0 if input.dim() == 1 else 1
    width = input.shape[class_dim]
    soft = target.shape == input.shape and target.is_floating_point()
    if soft:
        if ignore_index >= 0:
            raise ValueError(f"{who}: ignore_index is not supported for probability targets")
    else:
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if class_dim else ()
        if tuple(target.shape) != expected:
            raise ValueError(
                f"{who}: target of shape {tuple(target.shape)} does not fit {name} of "
                f"shape {tuple(input.shape)}: expected global class indices of shape "
                f"{expected} or this slice's probabilities of shape {tuple(input.shape)}"
            )
        check_class_index_dtype(who, target)
        target = index_target_for_kernels(target, ignore_index)
    out_shape = tuple(input.shape[:class_dim]) + tuple(input.shape[class_dim + 1 :])
    if input.dim() == 1:
        logits, target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:  # (N, C_r, d1, ...) -> (N * d1 * ..., C_r)
        logits = input.movedim(1, -1).reshape(-1, width)
        target = target.movedim(1, -1).reshape(-1, width) if soft else target.reshape(-1)
    return logits, target, out_shape, soft


def _check_return_stats(who: str, return_stats: object) -> bool:
    if not isinstance(return_stats, bool):
        raise TypeError(f"{who}: return_stats must be a bool, got {type(return_stats).__name__}")
    return return_stats


def _check_soft_stats_vocab(who: str, sh: _Shard, soft: bool, want_stats: bool) -> None:
    # The same verdict on every rank: V is global.
    if soft and want_stats and sh.vocab > 2**_KEY_CLASS_BITS:
        raise NotImplementedError(
            f"{who}: return_stats with probability targets needs V <= 2**30 classes, got {sh.vocab}"
        )


def _check_linear(
    who: str,
    input: object,
    W: object,
    target: object,
    b: object,
    weight: object,
) -> None:
    wn = "local_weight" if who == _LCE else "linear_weight"  # the argument's name in ``who``
    for arg, what in ((input, "input"), (W, wn), (target, "target")):
        if not isinstance(arg, Tensor):
            raise TypeError(f"{who}: {what} must be a tensor, got {type(arg).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{who}: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: input must have shape (D,), (N, D) or (..., D), got a scalar")
    if W.dim() != 2:
        raise ValueError(f"{who}: {wn} must be 2-D (V_r, D), got {tuple(W.shape)}")
    Vr, D = W.shape
    if input.shape[-1] != D:
        raise ValueError(
            f"{who}: input has {input.shape[-1]} features but {wn} of shape {(Vr, D)} expects D={D}"
        )
    if W.dtype != input.dtype:
        raise TypeError(f"{who}: input ({input.dtype}) and {wn} ({W.dtype}) differ")
    if b is not None:
        if not isinstance(b, Tensor) or tuple(b.shape) != (Vr,):
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{who}: linear_bias must be this slice's ({Vr},), got {shape}")
        if b.dtype != input.dtype:
            raise TypeError(f"{who}: linear_bias ({b.dtype}) must have the input's dtype")
    for t, what in ((W, wn), (target, "target"), (b, "linear_bias")):
        if t is not None and t.device != input.device:
            raise ValueError(f"{who}: {what} is on {t.device} but input is on {input.device}")
    if target.is_floating_point():
        raise NotImplementedError(f"{who}: probability targets are not supported")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{who}: target of shape {tuple(target.shape)} does not fit input of shape "
            f"{tuple(input.shape)}: expected {tuple(input.shape[:-1])}"
        )
    check_class_index_dtype(who, target)
    _check_weight(who, weight, input.device)
