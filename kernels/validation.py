"""One check per tensor argument of the losses, shared by every entry point.

``cross_entropy``, ``linear_cross_entropy``, their modules and the vocabulary-parallel calls
(each rank's own arguments, before the rank agreement) check their tensors here, so that the
same bad tensor gets the same message wherever it is passed: ``who`` names the public function
called, ``name`` the argument as that function calls it (``local_logits``, ``local_weight``).
The options that are not tensors are checked in ``options.py``.

With ``sharded=True`` the logits or the linear weight are one rank's slice of the classes: the
messages speak of the slice (``C_r``, ``V_r``), a slice may hold no class, and the class
weights' length is checked only once the ranks have agreed on V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .index_check import target_check_enabled, unwrap_functorch

# Class-index dtypes: torch takes int64 and uint8 ("Long or Byte"); int32 is a fusedce extra.
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


def check_tensors(who: str, **named: object) -> None:
    """Each of ``named`` (argument name -> value) is a tensor.

    Raises:
        TypeError: naming the first argument that is not.
    """
    for what, arg in named.items():
        if not isinstance(arg, Tensor):
            raise TypeError(f"{who}: {what} must be a tensor, got {type(arg).__name__}")


def check_input(who: str, input: Tensor, shapes: str, name: str = "input") -> None:
    """``input`` is a floating tensor of at least one dimension (``shapes`` says which).

    Raises:
        TypeError: not floating point. ValueError: a scalar.
    """
    if not input.is_floating_point():
        raise TypeError(f"{who}: {name} must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: {name} must have shape {shapes}, got a scalar")


def check_device(
    who: str, what: str, tensor: Tensor | None, input: Tensor, name: str = "input"
) -> None:
    """``tensor`` (the argument ``what``) is None or on the device of ``input`` (``name``)."""
    if tensor is not None and tensor.device != input.device:
        raise ValueError(f"{who}: {what} is on {tensor.device} but {name} is on {input.device}")


def check_class_weight(
    who: str, weight: object, num_classes: int | None, device: torch.device | None = None
) -> None:
    """``weight`` is None or a floating (C,) tensor on ``device`` that needs no gradient
    (``num_classes=None``: any length, for a slice that does not know C yet).

    Raises:
        ValueError: wrong shape or device. TypeError: not floating point.
        RuntimeError: ``weight.requires_grad`` (the loss is not differentiable with respect to
            class weights; torch raises the same).
    """
    if weight is None:
        return
    if (
        not isinstance(weight, Tensor)
        or weight.dim() != 1
        or (num_classes is not None and weight.numel() != num_classes)
    ):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        count = "the V" if num_classes is None else str(num_classes)
        raise ValueError(
            f"{who}: weight must be a 1-D tensor of {count} class weights, got {shape}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{who}: weight must be floating point, got {weight.dtype}")
    if device is not None and weight.device != device:
        raise ValueError(f"{who}: weight is on {weight.device} but input is on {device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{who}: the loss is not differentiable with respect to the class weights "
            "(weight.requires_grad=True); pass weight.detach()"
        )


def check_class_index_dtype(who: str, target: Tensor) -> None:
    """Class indices are int64, int32 or uint8 (``INDEX_DTYPES``)."""
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{who}: class-index targets must be int64, int32 or uint8, got {target.dtype}"
        )


def check_token_weight(
    who: str, token_weight: object, shape: tuple[int, ...], device: torch.device
) -> None:
    """``token_weight`` is None or a floating tensor of ``shape`` (the loss's per-element shape)
    on ``device``, finite and >= 0, that needs no gradient.

    The value check reads the tensor: free on the CPU, one host sync on CUDA (skipped there
    while ``set_target_check(False)``).

    Raises:
        ValueError: wrong shape or device, negative or non-finite values. TypeError: not a
            floating tensor. RuntimeError: ``requires_grad`` (token weights are not
            differentiated).
    """
    if token_weight is None:
        return
    if not isinstance(token_weight, Tensor):
        raise TypeError(f"{who}: token_weight must be a tensor, got {type(token_weight).__name__}")
    if tuple(token_weight.shape) != tuple(shape):
        raise ValueError(
            f"{who}: token_weight must have the per-element loss shape {tuple(shape)}, got "
            f"{tuple(token_weight.shape)}"
        )
    if not token_weight.is_floating_point():
        raise TypeError(f"{who}: token_weight must be floating point, got {token_weight.dtype}")
    if token_weight.device != device:
        raise ValueError(
            f"{who}: token_weight is on {token_weight.device} but input is on {device}"
        )
    if token_weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{who}: the loss is not differentiated with respect to token_weight "
            "(token_weight.requires_grad=True); pass token_weight.detach()"
        )
    if not torch.compiler.is_compiling():  # compiled, the custom ops check inside
        check_token_weight_values(who, token_weight)


def check_token_weight_values(who: str, token_weight: Tensor | None) -> None:
    """Raises ValueError for negative or non-finite token weights (free on the CPU; one host
    sync on CUDA, skipped there while ``set_target_check(False)``)."""
    if token_weight is None or token_weight.numel() == 0:
        return
    # Under torch.func transforms: the values of every sample (vmap cannot read one).
    token_weight = unwrap_functorch(token_weight)
    if token_weight.device.type == "cpu" or target_check_enabled():
        if not bool(torch.isfinite(token_weight).all()):
            raise ValueError(f"{who}: token_weight has non-finite values")
        if bool((token_weight < 0).any()):
            raise ValueError(f"{who}: token_weight has negative values")


# --------------------------------------------------------------------------------------------
# cross_entropy: logits and target
# --------------------------------------------------------------------------------------------


def check_logits_target(
    who: str,
    input: Tensor,
    target: Tensor,
    ignore_index: int,
    name: str = "input",
    sharded: bool = False,
) -> bool:
    """The target of logits ``input`` (N, C, d1, ...): class indices of shape (N, d1, ...) (a
    valid index dtype) or probabilities of the input's shape. Returns whether they are
    probabilities.

    Raises:
        TypeError: probabilities that are not floating point, a bad index dtype.
        ValueError: a shape that fits neither; ``ignore_index`` >= 0 with probabilities.
    """
    if target.shape == input.shape:
        if not target.is_floating_point():
            raise TypeError(
                f"{who}: a target of the {name}'s shape holds class probabilities and must be "
                f"floating point, got {target.dtype}"
            )
        if ignore_index >= 0:
            raise ValueError(f"{who}: ignore_index is not supported for probability targets")
        return True
    expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.dim() > 1 else ()
    if tuple(target.shape) != expected:
        indices = "global class indices" if sharded else "class indices"
        probs = "this slice's probabilities" if sharded else "probabilities"
        raise ValueError(
            f"{who}: target of shape {tuple(target.shape)} does not fit {name} of shape "
            f"{tuple(input.shape)}: expected {indices} of shape {expected} or {probs} of shape "
            f"{tuple(input.shape)}"
        )
    check_class_index_dtype(who, target)
    return False


def check_cross_entropy_args(
    who: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    name: str = "input",
    sharded: bool = False,
) -> bool:
    """The tensors of a cross-entropy call: logits ``input`` of shape (C,), (N, C) or
    (N, C, d1, ..., dk), its ``target`` and class ``weight`` (C,; the full V, only checked as
    1-D where ``sharded``). Returns whether the targets are probabilities."""
    check_tensors(who, **{name: input, "target": target})
    classes = "C_r" if sharded else "C"
    check_input(who, input, f"({classes},), (N, {classes}) or (N, {classes}, d1, ...)", name)
    check_device(who, "target", target, input, name)
    width = input.shape[0 if input.dim() == 1 else 1]
    if width == 0 and not sharded:  # a rank's slice may hold no class
        raise ValueError(f"{who}: {name} has 0 classes")
    check_class_weight(who, weight, None if sharded else width, input.device)
    return check_logits_target(who, input, target, ignore_index, name, sharded)


def loss_shape(input: Tensor) -> tuple[int, ...]:
    """The per-element loss shape of logits (C,), (N, C) or (N, C, d1, ...): (), (N,) or
    (N, d1, ...)."""
    class_dim = 0 if input.dim() == 1 else 1
    return tuple(input.shape[:class_dim]) + tuple(input.shape[class_dim + 1 :])


def logits_rows(input: Tensor, target: Tensor, soft: bool) -> tuple[Tensor, Tensor]:
    """Checked logits and target as rows: logits (M, C) with the classes last, target (M,)
    class indices or (M, C) probabilities. A view where the layout allows."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0)
    if input.dim() == 2:
        return input, target
    # (N, C, d1, ...) -> (N * d1 * ..., C): the class dimension last.
    width = input.shape[1]
    logits = input.movedim(1, -1).reshape(-1, width)
    return logits, target.movedim(1, -1).reshape(-1, width) if soft else target.reshape(-1)


# --------------------------------------------------------------------------------------------
# linear_cross_entropy: the head's input, weight, bias and target
# --------------------------------------------------------------------------------------------


def check_linear_weight(
    who: str,
    linear_weight: Tensor,
    input: Tensor,
    name: str = "linear_weight",
    sharded: bool = False,
) -> tuple[int, int]:
    """``linear_weight`` is (V, D) with the input's D and dtype (a rank's slice of the rows
    where ``sharded``: it may hold none). Returns (V, D).

    Raises:
        ValueError: not 2-D (NotImplementedError for more dimensions), 0 rows, another D.
        TypeError: another dtype than the input's.
    """
    if linear_weight.dim() != 2:
        if linear_weight.dim() > 2:
            raise NotImplementedError(
                f"{who}: K-dimensional {name} of shape {tuple(linear_weight.shape)} is not "
                "supported; pass a 2-D (V, D) weight"
            )
        raise ValueError(f"{who}: {name} must be 2-D (V, D), got {tuple(linear_weight.shape)}")
    V, D = linear_weight.shape
    if V == 0 and not sharded:
        raise ValueError(f"{who}: {name} has 0 classes (shape {(V, D)})")
    if input.shape[-1] != D:
        raise ValueError(
            f"{who}: input has {input.shape[-1]} features (shape {tuple(input.shape)}) but "
            f"{name} of shape {(V, D)} expects D={D}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"{who}: input ({input.dtype}) and {name} ({linear_weight.dtype}) must have the "
            "same dtype"
        )
    return V, D


def check_linear_bias(who: str, linear_bias: object, rows: int, input: Tensor) -> None:
    """``linear_bias`` is None or a (V,) tensor of the input's dtype (V: the weight's rows)."""
    if linear_bias is None:
        return
    if not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (rows,):
        shape = tuple(linear_bias.shape) if isinstance(linear_bias, Tensor) else linear_bias
        raise ValueError(f"{who}: linear_bias must have shape ({rows},), got {shape}")
    if linear_bias.dtype != input.dtype:
        raise TypeError(
            f"{who}: linear_bias ({linear_bias.dtype}) must have the input's dtype ({input.dtype})"
        )


def check_head_target(
    who: str, target: Tensor, input: Tensor, num_classes: int | None = None
) -> None:
    """Class indices of shape ``input.shape[:-1]``. Probabilities are refused: those of shape
    (..., V), or any floating target where V is not known (``num_classes=None``, a slice).

    Raises:
        NotImplementedError: probabilities. ValueError: another shape. TypeError: the dtype.
    """
    expected = tuple(input.shape[:-1])
    if target.is_floating_point() and (
        num_classes is None or tuple(target.shape) == (*expected, num_classes)
    ):
        raise NotImplementedError(
            f"{who}: probability (soft) targets are not supported; pass class indices of shape "
            f"{expected}, or use fusedce.cross_entropy on materialised logits"
        )
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{who}: target of shape {tuple(target.shape)} does not fit input of shape "
            f"{tuple(input.shape)}: expected class indices of shape {expected}"
        )
    check_class_index_dtype(who, target)


def check_linear_args(
    who: str,
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    name: str = "linear_weight",
    sharded: bool = False,
) -> tuple[int, int]:
    """The tensors of a fused-head call: hidden states ``input`` (..., D), ``linear_weight``
    (V, D) (``name``: the argument's name in ``who``), ``target`` (...), ``linear_bias`` (V,)
    and class ``weight`` (V,; the full V, only checked as 1-D where ``sharded``). Returns
    (V, D) of the weight."""
    check_tensors(who, input=input, **{name: linear_weight}, target=target)
    check_input(who, input, "(D,), (N, D) or (..., D)")
    V, D = check_linear_weight(who, linear_weight, input, name, sharded)
    check_linear_bias(who, linear_bias, V, input)
    check_class_weight(who, weight, None if sharded else V, input.device)
    for what, tensor in ((name, linear_weight), ("linear_bias", linear_bias), ("target", target)):
        check_device(who, what, tensor, input)
    check_head_target(who, target, input, None if sharded else V)
    return V, D
