"""The Classifier's distillation options (``distill_top_k``, ``distill_divergence``,
``distill_dense``): their checks and the fused divergence they train on.

Without them, soft targets train on the cross-entropy against the teacher's whole distribution
``P`` (``(B, C)`` logits built). With ``fused_head`` and one of them, the student trains on a
divergence through ``fusedce.linear_distillation_loss`` instead, and the ``(B, C)`` logits are
never built: the teacher's top-k of ``P`` with the tail as one bin (``distill_top_k``), or the
teacher's own head fused beside the student's (``distill_dense``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

import fusedce

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]

# A data module's ``teacher_head(x (B, D)) -> (hidden (B, H_t), weight (C, H_t))``.
TeacherHead = Callable[[Tensor], tuple[Tensor, Tensor]]


def check_distillation(top_k: Any, divergence: Any, dense: Any, extras: dict[str, bool]) -> None:
    """Raises ``ValueError`` for bad distillation options, or options the fused divergence does
    not take.

    Args:
        top_k: ``distill_top_k``: an integer >= 0 (0 = off).
        divergence: ``distill_divergence``: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        dense: ``distill_dense``.
        extras: The Classifier's other loss options, by name: whether each is set (the fused
            divergence takes none of them: refused, never ignored).

    Raises:
        ValueError: If an option is out of range, both ``top_k`` and ``dense`` are set, or an
            option of ``extras`` is set beside one of them.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"distill_top_k must be an integer >= 0, got {top_k!r}")
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(
            f"distill_divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got {divergence!r}"
        )
    if top_k and dense:
        raise ValueError("distill_top_k and distill_dense exclude each other: choose one")
    refused = [name for name, on in extras.items() if on]
    if (top_k or dense) and refused:
        which = "distill_top_k" if top_k else "distill_dense"
        raise ValueError(f"{which} does not take {', '.join(refused)}")


def fused_distillation(
    x: Tensor,
    p: Tensor,
    features: Callable[[Tensor], Tensor],
    head: torch.nn.Linear,
    *,
    top_k: int,
    divergence: Divergence,
    teacher_head: TeacherHead | None = None,
) -> Tensor:
    """The divergence between the teacher and the student on the fused head.

    The ``(B, C)`` logits are never built: the teacher is either the top-k of ``p`` with the
    tail as one bin (``distill_top_k``), or its whole distribution from its own head, fused
    beside the student's (``distill_dense``: ``teacher_head`` given). Under autocast the loss
    casts nothing itself: the heads are cast here, as autocast does for ``F.linear``.

    Args:
        x: Inputs ``(B, D)``.
        p: The teacher's distribution ``(B, C)`` (its top-k is read with ``top_k``).
        features: The student's body, ``(B, D) -> (B, H)``.
        head: The student's output layer, weight ``(C, H)`` and bias ``(C,)``.
        top_k: How many of the teacher's largest entries to keep (without ``teacher_head``).
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        teacher_head: The data module's teacher head (``distill_dense``): distil from the
            teacher's whole distribution instead of ``p``'s top-k; None: the top-k.

    Returns:
        The mean divergence over the rows, a scalar.
    """
    h = features(x)
    weight, bias = head.weight, head.bias
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)
    options = {"linear_bias": bias, "divergence": divergence}
    if teacher_head is not None:
        teacher_h, teacher_w = teacher_head(x)
        teacher = {  # one dtype per head: the teacher's in the student's
            "teacher_input": teacher_h.to(h.dtype),
            "teacher_weight": teacher_w.to(h.dtype),
        }
    else:
        top_p, ids = p.float().topk(min(top_k, p.shape[-1]), dim=-1)
        teacher = {"teacher_ids": ids, "teacher_log_probs": top_p.log()}
    return fusedce.linear_distillation_loss(h, weight, **teacher, **options)
