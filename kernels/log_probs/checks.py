"""The argument checks of ``token_log_probs`` and ``linear_token_log_probs``, shared by their
plain and vocabulary-parallel paths (every message starts with the name of the function called,
``who``). The checks the losses share live in ``validation`` and ``options``; this module adds
what only these functions check, in their own words."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ..options import check_chunk_size, check_flag, check_options, check_temperature
from ..validation import (
    check_class_index_dtype,
    check_device,
    check_input,
    check_linear_weight,
    check_tensors,
)


class LogitsCall(NamedTuple):
    """The arguments of one ``token_log_probs`` call, as given (unchecked)."""

    logits: Tensor  # (..., V), or this rank's (..., V_r) under a process group
    target: Tensor  # (...) class indices
    temperature: object
    ignore_index: object
    return_entropy: object


class HeadCall(NamedTuple):
    """The arguments of one ``linear_token_log_probs`` call, as given (unchecked)."""

    input: Tensor  # (..., D)
    linear_weight: Tensor  # (V, D), or this rank's (V_r, D)
    target: Tensor  # (...) class indices
    linear_bias: Tensor | None  # (V,) or (V_r,)
    temperature: object
    ignore_index: object
    return_entropy: object
    chunk_size: object


class LogProbOptions(NamedTuple):
    """The checked options of one call."""

    temperature: float  # T > 0
    ignore_index: int
    entropy: bool  # return_entropy


def check_log_prob_options(who: str, call: LogitsCall | HeadCall) -> LogProbOptions:
    """The options of a call that are not tensors (the head's ``chunk_size`` too)."""
    T = check_temperature(who, call.temperature)
    ii = check_options(who, call.ignore_index, 0.0, "none").ignore_index
    entropy = check_flag(who, "return_entropy", call.return_entropy)
    check_chunk_size(who, getattr(call, "chunk_size", None))
    return LogProbOptions(T, ii, entropy)


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


def check_logits(who: str, call: LogitsCall, slice_ok: bool = False) -> None:
    """``logits`` (..., V) floating with V >= 1 (V = 0 for a vocabulary slice with
    ``slice_ok``) and ``target`` (...) class indices beside it."""
    logits, target = call.logits, call.target
    check_tensors(who, logits=logits)
    if not logits.is_floating_point():
        raise TypeError(f"{who}: logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() == 0 or (logits.shape[-1] == 0 and not slice_ok):
        raise ValueError(
            f"{who}: logits must have shape (..., V) with V >= 1 classes last, got "
            f"{tuple(logits.shape)}"
        )
    _check_target(who, target, tuple(logits.shape[:-1]), logits.device)


def check_head(who: str, call: HeadCall, slice_ok: bool = False) -> None:
    """``input`` (..., D), ``linear_weight`` (V, D) of its dtype (V = 0 allowed for a
    vocabulary slice with ``slice_ok``), ``linear_bias`` (V,) or None, ``target`` (...) class
    indices, all on one device."""
    input, linear_weight, target, linear_bias = call[:4]
    check_tensors(who, input=input, linear_weight=linear_weight)
    check_input(who, input, "(..., D)")
    # One message for both (fewer than 2 dimensions, or no class): before the shared check.
    if linear_weight.dim() != 2 or (linear_weight.shape[0] == 0 and not slice_ok):
        raise ValueError(
            f"{who}: linear_weight must be 2-D (V, D) with V >= 1, got {tuple(linear_weight.shape)}"
        )
    V, _ = check_linear_weight(who, linear_weight, input, sharded=slice_ok)
    check_device(who, "linear_weight", linear_weight, input)
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
