"""Torch fallback: the same per-row loss and gradient as the Triton kernel, from torch ops.

It runs wherever the kernel does not (CPU tensors, float64) and defines the numbers the kernel
is held to; see ``triton_cross_entropy`` for the formulas.
"""

from __future__ import annotations

import torch


def cross_entropy_fwd_bwd_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    loss_rows: torch.Tensor,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> None:
    """Fills ``loss_rows`` (and ``grad``, scaled by ``scale``) exactly as the Triton launcher does.

    Args:
        logits: (M, V) float tensor.
        target: (M,) integer class indices, or (M, V) probabilities.
        weight: (V,) class weights or None.
        ignore_index: class index whose rows contribute nothing (class-index targets only).
        label_smoothing: in [0, 1].
        loss_rows: (M,) output, the unnormalised per-row loss.
        grad: (M, V) output (may alias ``logits``) or None.
        scale: () scalar multiplying the gradient; required when ``grad`` is given.
    """
    M, V = logits.shape
    if M == 0:
        return
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=1)
    # An all -inf row has lse = -inf; keep the probabilities finite as the kernel does.
    p = torch.exp(x - torch.where(torch.isneginf(lse), 0.0, lse)[:, None])
    w = weight.to(acc) if weight is not None else torch.ones(V, dtype=acc, device=x.device)
    smooth = label_smoothing / V

    if target.dim() == 2:
        coef = w * ((1.0 - label_smoothing) * target.to(acc) + smooth)
        a = coef.sum(1)
        # 0 * log(0) counts as 0 (its limit), also where a logit is -inf.
        lin = torch.where(coef != 0, coef * x, 0.0).sum(1)
        loss = a * lse - lin
        g = None if grad is None else a[:, None] * p - coef
    else:
        y = target.long()
        valid = y != ignore_index
        in_range = (y >= 0) & (y < V)
        bad = valid & ~in_range
        y_ok = valid & in_range
        y_safe = torch.where(y_ok, y, 0)
        x_y = torch.where(y_ok, x.gather(1, y_safe[:, None])[:, 0], 0.0)
        hard = torch.where(y_ok, (1.0 - label_smoothing) * w[y_safe], 0.0)
        a = hard
        lin = torch.zeros_like(lse)
        if label_smoothing > 0.0:
            a = a + smooth * w.sum()
            lin = smooth * torch.where(w != 0, w * x, 0.0).sum(1)
        a = torch.where(valid, a, 0.0)
        loss = torch.where(valid, a * lse - hard * x_y - lin, 0.0)
        loss = torch.where(bad, float("nan"), loss)
        g = None
        if grad is not None:
            g = a[:, None] * p
            g.scatter_add_(1, y_safe[:, None], -hard[:, None])
            if label_smoothing > 0.0:
                g -= smooth * w
            g = torch.where(valid[:, None], g, 0.0)
            g = torch.where(bad[:, None], float("nan"), g)
    loss_rows.copy_(loss)
    if grad is not None:
        grad.copy_(g * scale.to(acc))
