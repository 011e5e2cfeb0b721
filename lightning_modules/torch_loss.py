"""The Classifier's loss written with torch ops (``loss_impl="torch"``), and the row masks it
shares with the fused loss: the reference that the fused runs are compared against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedce import CrossEntropyStats


def scaled_logits(logits: Tensor, logit_scale: float, softcap: float | None) -> Tensor:
    """The logits the loss sees, float32: ``s * logits``, then ``c * tanh(z / c)`` when a
    softcap ``c`` is set (``s = logit_scale``)."""
    z = logits.float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def valid_rows(target: Tensor, ignore_index: int) -> Tensor:
    """Rows that count, ``(B,)`` bool: hard targets other than ``ignore_index``; all soft ones."""
    if target.is_floating_point():
        return torch.ones(target.shape[:-1], dtype=torch.bool, device=target.device)
    return target != ignore_index


def correct_rows(preds: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(correct, valid)``, both ``(B,)`` bool, for classes ``preds (B,)`` against hard
    ``(B,)`` or soft ``(B, C)`` targets (soft: their argmax); ``correct`` is False where not
    ``valid``."""
    valid = valid_rows(target, ignore_index)
    if target.is_floating_point():
        return preds == target.argmax(dim=-1), valid
    return (preds == target) & valid, valid


def accuracy(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Top-1 accuracy of logits ``(B, C)`` against hard ``(B,)`` or soft ``(B, C)`` targets.

    Returns:
        ``(accuracy, count)``: 0-dim tensors; ``count`` = rows that count (hard targets equal to
        ``ignore_index`` do not). No host synchronisation.
    """
    correct, valid = correct_rows(logits.argmax(dim=-1), target, ignore_index)
    count = valid.sum().float()
    return correct.sum().float() / count.clamp_min(1.0), count


def torch_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    z_loss: float,
) -> tuple[Tensor, CrossEntropyStats]:
    """``F.cross_entropy`` of `scaled_logits` plus the z-loss term, and the statistics that
    ``fusedce.cross_entropy(..., return_stats=True)`` returns, from their definitions.

    Args:
        logits: ``(B, C)`` logits.
        target: Hard ``(B,)`` class indices or soft ``(B, C)`` probabilities.
        ignore_index: Hard-target value that counts for nothing.
        label_smoothing: As ``F.cross_entropy``'s.
        logit_scale: Scale of the logits before the softcap.
        softcap: Soft cap of the scaled logits (None: none).
        z_loss: Coefficient of the mean ``lse**2`` over the rows that count (0: off).

    Returns:
        ``(loss, stats)``: float32 scalar; ``CrossEntropyStats`` of detached tensors.
    """
    z = scaled_logits(logits, logit_scale, softcap)
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, dim=-1)
    z_part = torch.zeros((), device=z.device)
    if z_loss:  # a mean over the rows that count; no row counts -> 0, as fusedce
        valid = valid_rows(target, ignore_index)
        z_part = z_loss * (lse.square() * valid).sum() / valid.sum().clamp_min(1)
        loss = loss + z_part
    with torch.no_grad():
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
        correct, _ = correct_rows(z.argmax(dim=-1), target, ignore_index)
    return loss, CrossEntropyStats(z_part.detach(), lse.detach(), entropy.detach(), correct)
