"""The torch backend: the row contract from torch ops, for CPU tensors and float64.

It defines the numbers the Triton kernel is held to; the formulas are in ``core.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import LossOptions, accumulation_dtype


def _target_terms(
    target: Tensor, weight: Tensor | None, opts: LossOptions, V: int, acc: torch.dtype
) -> dict:
    """What the loss and the gradient need from the targets, per row.

    Probabilities: ``coef`` (M, V), the coefficient of each logit. Class indices: ``hard`` (M,),
    the coefficient of the true-class logit, ``y`` (M,) that class (0 where there is none),
    ``valid`` / ``bad`` (M,) masks and ``smooth`` = eps / C, the smoothing coefficient that
    every class gets (times its weight).
    """
    eps = opts.label_smoothing
    smooth = eps / V
    if target.dim() == 2:
        coef = (1.0 - eps) * target.to(acc) + smooth
        if weight is not None:
            coef.mul_(weight)
        return {"coef": coef}
    y = target.long()
    valid = y != opts.ignore_index
    y_ok = valid & (y >= 0) & (y < V)
    y_safe = torch.where(y_ok, y, 0)
    hard = y_ok.to(acc) * (1.0 - eps)
    if weight is not None:
        hard = hard * weight[y_safe]
    return {"hard": hard, "y": y_safe, "valid": valid, "bad": valid & ~y_ok, "smooth": smooth}


def run_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    stats: Tensor,
    grad: Tensor | None,
    scale: Tensor | None,
    grad_only: bool = False,
) -> None:
    """The row contract (see ``core.run_rows``) from torch ops."""
    M, V = logits.shape
    if M == 0:
        return
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)  # no copy for float32 / float64 logits
    w = weight
    terms = _target_terms(target, w, opts, V, acc)
    soft = "coef" in terms
    cpu = logits.device.type == "cpu"
    if grad_only:
        lse, a = stats[1], stats[2]
    else:
        lse = torch.logsumexp(x, dim=1)
        # x - lse: the log-probabilities, built in the gradient buffer where it can hold them.
        in_grad = grad is not None and grad.dtype == acc and grad.is_contiguous()
        if in_grad and not grad.is_set_to(x):
            logp = torch.sub(x, lse[:, None], out=grad)
        else:
            logp = x - lse[:, None]
        if soft:
            coef = terms["coef"]
            a = coef.sum(1)
            # 0 * log(0) counts as 0 (its limit), also where a logit is -inf.
            loss = -torch.where(coef != 0, coef * logp, 0.0).sum(1)
        else:
            hard, valid, smooth = terms["hard"], terms["valid"], terms["smooth"]
            loss = -hard * logp.gather(1, terms["y"][:, None])[:, 0]
            a = hard
            if opts.label_smoothing > 0.0:
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
            loss = torch.where(terms["bad"], float("nan"), loss)
        stats[0].copy_(loss)
        stats[1].copy_(lse)
        stats[2].copy_(a)
    if grad is None:
        return

    # grad = scale * (a * softmax(x) - b), built in place where the buffer allows.
    s = scale.to(acc)
    s_row = s[:, None] if s.dim() == 1 else s
    p = logp.exp_() if not grad_only else torch.exp(x - lse[:, None])
    p.mul_(a[:, None] * s_row)
    if soft:
        p.sub_(terms["coef"].mul_(s_row))
    else:
        valid, bad, hard = terms["valid"], terms["bad"], terms["hard"]
        hard_s = hard * (s if s.dim() == 1 else s.expand(M))
        p.scatter_add_(1, terms["y"][:, None], -hard_s[:, None])
        if opts.label_smoothing > 0.0:
            w_row = w if w is not None else torch.ones(V, dtype=acc, device=x.device)
            row_s = torch.where(valid, terms["smooth"] * (s if s.dim() == 1 else s.expand(M)), 0.0)
            p.addr_(row_s, w_row, alpha=-1.0)
        # Ignored rows are exactly 0 (also with NaN logits); unchecked bad rows are NaN. On the
        # CPU, skip these passes when no row needs them (reading the masks costs no sync there).
        if not cpu or not bool(valid.all()):
            p.masked_fill_(~valid[:, None], 0.0)
        if not cpu or bool(bad.any()):
            p.masked_fill_(bad[:, None], float("nan"))
    if p is not grad:
        grad.copy_(p)
