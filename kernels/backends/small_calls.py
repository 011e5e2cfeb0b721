"""The torch backend's shortcut for small calls: a plain CPU call of at most
``SMALL_CPU_ELEMENTS`` logits goes to torch's own ``F.cross_entropy``, with fusedce's semantics
where torch's differ (float32 loss for half input, a mean over nothing is 0, a bad class index
raises fusedce's IndexError). Calls that torch would answer differently stay on the row contract.

``backends.small_call`` hands ``cross_entropy`` to the public functions on the "auto" setting;
a named backend keeps the row contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import index_check
from ..options import LossOptions, accumulation_dtype
from ..stat_rows import CrossEntropyStats

# Up to this many logits, a plain call on the CPU's torch backend goes to torch's own fused
# operator: the same numbers with a fraction of the per-call overhead of the row contract (about
# 30 small ops), which dominates at this size (128 x 2 float32, 2-core development machine: 166
# us a forward + backward through the row contract, 20 us through F.cross_entropy).
SMALL_CPU_ELEMENTS = 1 << 15
# Small calls with at most this many classes and at least this many rows take torch's K-dim
# layout (see ``plain_loss``).
_FEW_CLASSES = 8
_MANY_ROWS = 512


def takes(
    logits: Tensor,
    target: Tensor,
    opts: LossOptions,
    tw: Tensor | None,
    inplace_backward: bool,
    target_grad: bool,
) -> bool:
    """A call that torch's ``F.cross_entropy`` computes exactly as the row contract would: on
    the CPU, small, class indices, no logit transform, z-loss or token weights
    (``return_stats`` is fine), nothing in place, and the index check on (a bad index raises
    before torch sees it). ``backends.small_call`` checked the rest: the backend left on
    "auto", and logits that the torch backend runs (no Triton interpreter)."""
    return (
        logits.device.type == "cpu"
        and logits.numel() <= SMALL_CPU_ELEMENTS
        and target.dim() == 1
        and not (inplace_backward or target_grad or tw is not None)
        and not opts.transforms_logits
        and opts.z_loss == 0.0
        and index_check.target_check_enabled()
    )


def plain_loss(
    logits: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions, who: str
) -> tuple[Tensor | None, bool]:
    """The loss of a small call through ``F.cross_entropy`` (differentiable), or None where
    the row contract must take it (a mean over nothing: 0 here, NaN in torch; an ignored row
    with non-finite logits); and whether every target is a class (none ignored)."""
    M, C = logits.shape
    if M == 0:
        return None, False
    target = target.long()
    # One min / max answers the usual case: every index a class, none ignored (reading them
    # costs no sync on the CPU).
    lo, hi = (int(v) for v in torch.aminmax(target))
    plain = lo >= 0 and hi < C and not lo <= opts.ignore_index <= hi
    if not plain:
        index_check.check_class_indices(target, C, opts.ignore_index, who)
        # An ignored row whose logits are NaN or inf (a masked vocabulary) gets a zero gradient
        # on the row contract; torch's log_softmax backward would give it NaN. One input, one
        # answer: such calls take the row contract.
        ignored = target == opts.ignore_index
        if bool(ignored.any()) and not bool(logits[ignored].isfinite().all()):
            return None, False
    if opts.mean and (weight is not None or not plain):
        valid = target != opts.ignore_index
        denom = valid.sum() if weight is None else weight[target[valid]].sum()
        if not bool(denom != 0):
            return None, plain
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    if C <= _FEW_CLASSES and M >= _MANY_ROWS:
        # A few classes and many rows: the same loss as K-dim input (1, C, M), whose softmax
        # runs vectorised along the rows instead of a short loop per row (2-core development
        # machine, 8192 x 2 float32 forward + backward: 98 us against 239 us).
        loss = F.cross_entropy(
            x.t().unsqueeze(0),
            target.unsqueeze(0),
            weight,
            ignore_index=opts.ignore_index,
            reduction=opts.reduction,
            label_smoothing=opts.label_smoothing,
        )
        return (loss.squeeze(0) if opts.reduction == "none" else loss), plain
    loss = F.cross_entropy(
        x,
        target,
        weight,
        ignore_index=opts.ignore_index,
        reduction=opts.reduction,
        label_smoothing=opts.label_smoothing,
    )
    return loss, plain


def plain_stats(
    logits: Tensor,
    target: Tensor,
    opts: LossOptions,
    out_shape: tuple[int, ...],
    loss: Tensor,
    all_valid: bool,
) -> CrossEntropyStats:
    """``return_stats`` of a small call from torch ops (z-loss is off: 0); ``all_valid``: no
    target is ignored."""
    with torch.no_grad():
        # Few ops: at these sizes each op's overhead is the cost.
        z = logits.to(accumulation_dtype(logits.dtype))
        z_max, i_max = z.max(dim=1, keepdim=True)
        p = torch.softmax(z, dim=1)
        # lse = max - log p_max (p_max >= 1 / C never underflows); H = -sum p log p, entr(0) = 0
        # so a logit of -inf contributes 0.
        lse = (z_max - p.gather(1, i_max).log_()).squeeze(1)
        entropy = torch.special.entr(p).sum(dim=1)
        correct = i_max.squeeze(1) == target
        if not all_valid:
            correct &= target != opts.ignore_index
    if lse.shape != out_shape:
        lse, entropy, correct = (t.reshape(out_shape) for t in (lse, entropy, correct))
    return CrossEntropyStats(loss.new_zeros(loss.shape), lse, entropy, correct)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    tw: Tensor | None,
    out_shape: tuple[int, ...],
    extras: bool,
    inplace_backward: bool,
    target_grad: bool,
    who: str,
) -> Tensor | tuple[Tensor, CrossEntropyStats] | None:
    """The result of a public call through ``F.cross_entropy`` -- the loss (in ``out_shape``
    for reduction="none"), and with ``extras`` its ``CrossEntropyStats`` -- or None where the
    row contract must take the call.

    Args:
        logits: (M, C) logits; target: (M,) class indices; weight: (C,) class weights or None.
        opts: the checked options; tw: (M,) prepared token weights, or None.
        out_shape: the per-element shape; extras: ``return_stats``.
        inplace_backward, target_grad: the call's in-place gradient, and whether the target
            needs a gradient (either keeps the row contract).
        who: the public name that errors name.
    """
    if not takes(logits, target, opts, tw, inplace_backward, target_grad):
        return None
    loss, all_valid = plain_loss(logits, target, weight, opts, who)
    if loss is None:
        return None
    loss = loss.reshape(out_shape) if opts.per_row else loss
    if not extras:
        return loss
    return loss, plain_stats(logits, target, opts, out_shape, loss, all_valid)
