"""The argument checks of ``token_log_probs`` and ``linear_token_log_probs``, shared by their
plain and vocabulary-parallel paths (every message starts with the name of the function called,
``who``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .validation import check_class_index_dtype

_FLOAT_MAX = 1.7976931348623157e308


def check_temperature(who: str, temperature: object) -> float:
    """``temperature`` as a float in (0, inf); raises TypeError / ValueError naming ``who``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        kind = type(temperature).__name__
        raise TypeError(f"{who}: temperature must be a float > 0, got {kind}")
    t = float(temperature)
    # Comparisons only: they trace under torch.compile (NaN fails them too).
    if not 0.0 < t <= _FLOAT_MAX:
        raise ValueError(f"{who}: temperature must be a finite float > 0, got {temperature}")
    return t


def check_flag(who: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be a bool, got {type(value).__name__}")
    return value


def _check_target(who: str, target: object, expected: tuple[int, ...], device) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{who}: target must be a tensor, got {type(target).__name__}")
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{who}: target of shape {tuple(target.shape)} does not fit: expected class "
            f"indices of shape {expected} (the input's shape without its last dimension)"
        )
    check_class_index_dtype(who, target)
    if target.device != device:
        raise ValueError(f"{who}: target is on {target.device} but input is on {device}")


def check_logits(who: str, logits: object, target: object, slice_ok: bool = False) -> None:
    """``logits`` (..., V) floating with V >= 1 (V = 0 for a vocabulary slice with
    ``slice_ok``) and ``target`` (...) class indices beside it."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{who}: logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{who}: logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() == 0 or (logits.shape[-1] == 0 and not slice_ok):
        raise ValueError(
            f"{who}: logits must have shape (..., V) with V >= 1 classes last, got "
            f"{tuple(logits.shape)}"
        )
    _check_target(who, target, tuple(logits.shape[:-1]), logits.device)


def check_head(
    who: str,
    input: object,
    linear_weight: object,
    target: object,
    linear_bias: object,
    slice_ok: bool = False,
) -> None:
    """``input`` (..., D), ``linear_weight`` (V, D) of its dtype (V = 0 allowed for a
    vocabulary slice with ``slice_ok``), ``linear_bias`` (V,) or None, ``target`` (...) class
    indices, all on one device."""
    for arg, what in ((input, "input"), (linear_weight, "linear_weight")):
        if not isinstance(arg, Tensor):
            raise TypeError(f"{who}: {what} must be a tensor, got {type(arg).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{who}: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: input must have shape (..., D), got a scalar")
    if linear_weight.dim() != 2 or (linear_weight.shape[0] == 0 and not slice_ok):
        raise ValueError(
            f"{who}: linear_weight must be 2-D (V, D) with V >= 1, got {tuple(linear_weight.shape)}"
        )
    V, D = linear_weight.shape
    if input.shape[-1] != D:
        raise ValueError(
            f"{who}: input has {input.shape[-1]} features (shape {tuple(input.shape)}) but "
            f"linear_weight of shape {(V, D)} expects D={D}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"{who}: input ({input.dtype}) and linear_weight ({linear_weight.dtype}) must have "
            "the same dtype"
        )
    if linear_weight.device != input.device:
        raise ValueError(
            f"{who}: linear_weight is on {linear_weight.device} but input is on {input.device}"
        )
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (V,):
            shape = tuple(linear_bias.shape) if isinstance(linear_bias, Tensor) else linear_bias
            raise ValueError(f"{who}: linear_bias must have shape ({V},), got {shape}")
        if linear_bias.dtype != input.dtype or linear_bias.device != input.device:
            raise TypeError(
                f"{who}: linear_bias ({linear_bias.dtype}, {linear_bias.device}) must have the "
                f"input's dtype and device ({input.dtype}, {input.device})"
            )
    _check_target(who, target, tuple(input.shape[:-1]), input.device)


def autocast_cast(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under autocast, the head's operands in the autocast dtype, as ``F.linear`` would run."""
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t: object) -> object:
        ok = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if ok else t

    return cast(input), cast(linear_weight), cast(linear_bias)
