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
    x = logits.to(acc)  # no copy for float32 / float64 logits
    # log-softmax in one fused op, written straight into the gradient buffer where it can be.
    if grad is not None and grad.dtype == acc and grad.is_contiguous() and not grad.is_set_to(x):
        logp = torch._log_softmax(x, 1, False, out=grad)
    else:
        logp = torch.log_softmax(x, dim=1)
    w = None if weight is None else weight.to(acc)
    smooth = label_smoothing / V
    cpu = logits.device.type == "cpu"

    if target.dim() == 2:
        coef = (1.0 - label_smoothing) * target.to(acc) + smooth
        if w is not None:
            coef.mul_(w)
        a = coef.sum(1)
        # 0 * log(0) counts as 0 (its limit), also where a logit is -inf.
        loss = -torch.where(coef != 0, coef * logp, 0.0).sum(1)
        valid = bad = None
    else:
        y = target.long()
        valid = y != ignore_index
        y_ok = valid & (y >= 0) & (y < V)
        bad = valid & ~y_ok
        y_safe = torch.where(y_ok, y, 0)
        hard = y_ok.to(acc) * (1.0 - label_smoothing)
        if w is not None:
            hard = hard * w[y_safe]
        loss = -hard * logp.gather(1, y_safe[:, None])[:, 0]
        a = hard
        if label_smoothing > 0.0:
            if w is None:
                w_sum, w_logp = float(V), logp.sum(1)
            elif bool((w == 0).any()):  # keep 0 * -inf = 0 where a class weight is 0
                w_sum, w_logp = w.sum(), torch.where(w != 0, logp, 0.0) @ w
            else:
                w_sum, w_logp = w.sum(), logp @ w
            loss = loss - smooth * w_logp
            a = a + smooth * w_sum
        a = torch.where(valid, a, 0.0)
        loss = torch.where(valid, loss, 0.0)
        loss = torch.where(bad, float("nan"), loss)
    loss_rows.copy_(loss)
    if grad is None:
        return

    # grad = scale * (a * softmax(x) - b), built in the log-softmax buffer.
    scale = scale.to(acc)
    p = logp.exp_()
    p.mul_((a * scale)[:, None])
    if valid is None:
        p.sub_(coef.mul_(scale))
    else:
        p.scatter_add_(1, y_safe[:, None], (-scale * hard)[:, None])
        if label_smoothing > 0.0:
            w_row = w if w is not None else torch.ones(V, dtype=acc, device=x.device)
            p.addr_(torch.where(valid, scale * smooth, 0.0), w_row, alpha=-1.0)
        # Ignored rows are exactly 0 (also with NaN logits); unchecked bad rows are NaN. On the
        # CPU, skip these passes when no row needs them (reading the masks costs no sync there).
        if not cpu or not bool(valid.all()):
            p.masked_fill_(~valid[:, None], 0.0)
        if not cpu or bool(bad.any()):
            p.masked_fill_(bad[:, None], float("nan"))
    if p is not grad:
        grad.copy_(p)
