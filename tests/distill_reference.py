"""The float64 reference of the distillation losses, built from their definitions on upcast
copies (torch autograd gives the gradient), and the inputs the distillation tests share."""

from __future__ import annotations

import torch
from torch import Tensor

# Relative-norm tolerance of the gradient: rounded to the logits' dtype once (twice for "none"
# in half precision: the unit-factor rows are not kept, but the factor is folded in float32).
GRAD_RTOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-10}
# The loss is accumulated in float32 whatever the logits' dtype.
LOSS_ATOL = {torch.float32: 3e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5, torch.float64: 1e-10}


def _kl(a: Tensor, b: Tensor) -> Tensor:
    """sum a log(a / b) over the last dimension, 0 log 0 = 0 (also in the derivative: where
    a = 0 nothing is differentiated, so 0 / 0 never appears)."""
    on = a > 0
    a_on = torch.where(on, a, 1.0)
    return torch.where(on, a_on * (a_on.log() - torch.where(on, b, 1.0).log()), 0.0).sum(-1)


def divergence_of(P: Tensor, Q: Tensor, divergence: str, beta: float) -> Tensor:
    """(M,) D(P, Q) over the last dimension, from the definitions."""
    if divergence == "forward_kl":
        return _kl(P, Q)
    if divergence == "reverse_kl":
        return _kl(Q, P)
    Mx = beta * P + (1 - beta) * Q
    return beta * _kl(P, Mx) + (1 - beta) * _kl(Q, Mx)


def reference(
    logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_log_probs: Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "bin",
    target: Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    upstream: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, d(loss * upstream) / d logits) in float64 (the upstream gradient is 1 for the
    scalar reductions when None, random-free)."""
    x = logits.detach().double().requires_grad_(True)
    V = x.shape[-1]
    X = x.reshape(-1, V)
    T = temperature
    q = torch.softmax(X / T, -1)
    if teacher_logits is not None:
        P, Q = torch.softmax(teacher_logits.detach().double().reshape(-1, V) / T, -1), q
    else:
        k = teacher_ids.shape[-1]
        ids = teacher_ids.reshape(-1, k)
        valid = ids >= 0
        safe = torch.where(valid, ids, 0)
        pS = torch.where(valid, teacher_log_probs.detach().double().reshape(-1, k).exp(), 0.0)
        qS = torch.where(valid, q.gather(1, safe), 0.0)
        if tail == "bin":
            P = torch.cat([pS, (1 - pS.sum(1, keepdim=True)).clamp_min(0)], 1)
            Q = torch.cat([qS, (1 - qS.sum(1, keepdim=True)).clamp_min(0)], 1)
        else:
            ps, qs = pS.sum(1, keepdim=True), qS.sum(1, keepdim=True)
            P = torch.where(ps > 0, pS / torch.where(ps > 0, ps, 1.0), 0.0)
            Q = torch.where(qs > 0, qS / torch.where(qs > 0, qs, 1.0), 0.0)
        # Padding holds p = q = 1 in both: a 0 term whose derivative is finite (at p = q = 0
        # autograd's p / q would be 0 / 0).
        # Where S holds all V classes the bin is empty (exactly 0 for both, not 1 - sum).
        empty_bin = valid.sum(1, keepdim=True) == V
        pad = torch.cat([~valid, empty_bin], 1)[:, : P.shape[1]]
        P, Q = torch.where(pad, 1.0, P), torch.where(pad, 1.0, Q)
    D = divergence_of(P, Q, divergence, beta)
    rows = torch.ones(X.shape[0], dtype=torch.bool)
    if target is not None:
        y = target.reshape(-1)
        rows = y != ignore_index
        ce = -torch.log_softmax(X, -1).gather(1, torch.where(rows, y, 0)[:, None])[:, 0]
        if hard_weight == 1.0:
            D = ce
        elif hard_weight > 0:
            D = (1 - hard_weight) * D + hard_weight * ce
    per_row = torch.where(rows, D, 0.0)
    if reduction == "none":
        loss = per_row.reshape(x.shape[:-1])
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        n = rows.sum()
        loss = per_row.sum() / n if n > 0 else per_row.sum() * 0.0
    up = upstream.double() if upstream is not None else torch.ones_like(loss)
    (grad,) = torch.autograd.grad((loss * up).sum(), x, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    return loss.detach(), grad


def sparse_teacher(
    N: int, V: int, k: int, pad: int = 0, mass: float = 0.9, random_seed: int = 3
) -> tuple[Tensor, Tensor]:
    """(N, k) distinct ids (the last ``pad`` of each row -1) and log-probabilities of a teacher
    whose mass on them is ``mass`` (the top-k of a random distribution, rescaled)."""
    g = torch.Generator().manual_seed(random_seed)
    scores = torch.rand(N, V, generator=g)
    ids = scores.argsort(1, descending=True)[:, :k].clone()
    w = torch.rand(N, k, generator=g) + 0.05
    if pad:
        ids[:, k - pad :] = -1
        w[:, k - pad :] = 0.0
    p = w / w.sum(1, keepdim=True).clamp_min(1e-30) * mass
    logp = torch.where(ids >= 0, p.log(), torch.full_like(p, -5.0))  # padding holds junk
    return ids, logp


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / max(||b||, 1e-8), in float64 (an exact 0 passes against float64 rounding)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-8))
