"""The distillation rows from torch ops: CPU tensors, float64, and anywhere Triton is missing.

It defines the numbers the Triton kernel (``triton_distill``) is held to. Per row i of the
student's logits x (M, V), with z = x / T, the row max m and log_sum = log sum exp(z - m):
log q = (z - m) - log_sum (shift-exact: never z - lse). The teacher is dense (its logits t,
log p = (t / T - m_t) - log_sum_t) or sparse (ids S and log p_S as given). Writes

* ``loss[i]`` = (1 - a) D_i + a CE_i (0 on rows that are not counted, NaN for a bad id that
  was not checked), D the divergence over the support (docs/DISTILLATION.md), CE the plain
  cross-entropy of x at temperature 1;
* with a gradient buffer, ``grad[i] = s_i d loss_i / d x_i``: (1 - a) / T * q_j (g_j - G) +
  a (softmax(x)_j - [j = y]), with g_j = dD / dq_j and G = sum over the support of q g (the
  tail bin counts as one element), times the scale s (one () factor or one per row).

The divergence's pieces are formed as r = q g, finite where g is not (q = 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..distill_options import DistillOptions
from ..options import accumulation_dtype

# Work through CPU rows in blocks of about this many bytes of accumulation-dtype values: a dense
# teacher's rows hold about six block-sized temporaries (log q, log p, d, r, q, the gradient),
# so the blocks are half the cross-entropy's (1 MiB: the fused head's peak stays within a few
# MiB of the fused cross-entropy's, plus the teacher's chunk).
CPU_ROW_BLOCK_BYTES = 1 << 20


def terms(logp: Tensor, logq: Tensor, opts: DistillOptions) -> tuple[Tensor, Tensor]:
    """Elementwise (d, r) of the divergence at one support element: the loss is sum d, and
    r = q dD/dq (r is finite where q = 0). 0 log 0 = 0 throughout.

    forward KL: d = p (log p - log q), r = -p.
    reverse KL: d = q (log q - log p), r = q (log q - log p + 1).
    JSD: with log m = log(beta p + (1 - beta) q), d = beta p (log p - log m) +
    (1 - beta) q (log q - log m), r = (1 - beta) q (log q - log m).
    """
    if opts.divergence == "forward_kl":
        p = logp.exp()
        return torch.where(p > 0, p * (logp - logq), 0.0), -p
    q = logq.exp()
    if opts.divergence == "reverse_kl":
        kl = torch.where(q > 0, q * (logq - logp), 0.0)
        return kl, torch.where(q > 0, kl + q, 0.0)
    beta = opts.beta
    p = logp.exp()
    log_b = math.log(beta) if beta > 0 else float("-inf")
    log_1b = math.log1p(-beta) if beta < 1 else float("-inf")
    logm = torch.logaddexp(logp + log_b, logq + log_1b)
    # beta = 0 (m = q) or 1 (m = p): the vanishing term is left out, not 0 * inf.
    kq = torch.where(q > 0, q * (logq - logm), 0.0) if beta < 1 else torch.zeros_like(q)
    d = (1.0 - beta) * kq
    if beta > 0:
        d = d + beta * torch.where(p > 0, p * (logp - logm), 0.0)
    return d, (1.0 - beta) * kq


def _log_softmax(x: Tensor, temperature: float) -> Tensor:
    """log softmax(x / T) of (M, V) rows in the accumulation dtype: torch's ``log_softmax``,
    which works from the row max ((z - m) - log_sum, shift-exact), in one fused pass."""
    return torch.log_softmax(x / temperature if temperature != 1.0 else x, 1)


def _masked_log_softmax(v: Tensor, valid: Tensor) -> Tensor:
    """log-softmax over the valid entries of each row of ``v``; -inf elsewhere and on rows with
    none (shift-exact: relative to the row's max)."""
    v = torch.where(valid, v, float("-inf"))
    mx = v.amax(1, keepdim=True)
    mx = torch.where(mx == float("-inf"), 0.0, mx)
    vc = v - mx
    out = vc - torch.logsumexp(vc, 1, keepdim=True)
    return torch.where(valid, out, float("-inf"))


def _rows(
    x: Tensor,
    teacher: Tensor | None,
    ids: Tensor | None,
    tlp: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    loss: Tensor,
    grad: Tensor | None,
    scale: Tensor | None,
) -> None:
    """One block of rows; see the module doc."""
    M, V = x.shape
    acc = accumulation_dtype(x.dtype)
    T, a = opts.temperature, opts.hard_weight
    xf = x.to(acc)
    logq = _log_softmax(xf, T)
    want = grad is not None
    D = torch.zeros(M, dtype=acc, device=x.device)
    gz = None
    bad = None
    if a < 1.0:
        if teacher is not None:
            logp = _log_softmax(teacher.to(acc), T)
            d, r = terms(logp, logq, opts)
            D = d.sum(1)
            if want:
                gz = r - logq.exp() * r.sum(1, keepdim=True)
        else:
            valid = ids >= 0
            bad = ((ids < -1) | (ids >= V)).any(1)
            valid = valid & (ids < V)
            safe = torch.where(valid, ids, 0)
            lq = torch.where(valid, logq.gather(1, safe), float("-inf"))
            lp = torch.where(valid, tlp.to(acc), float("-inf"))
            if not opts.bin:
                lq, lp = _masked_log_softmax(lq, valid), _masked_log_softmax(lp, valid)
            d, r = terms(lp, lq, opts)
            d, r = torch.where(valid, d, 0.0), torch.where(valid, r, 0.0)
            D, G = d.sum(1), r.sum(1)
            if opts.bin:
                # The tail bin: every class outside S, p_tail = max(0, 1 - sum p_S), and
                # q_tail = 1 - sum_S q (clamped at 0 against rounding).
                # Where S holds all V classes the bin is empty: exactly 0 for both (1 - sum
                # would leave rounding there, and a p_tail of 1e-8 against a q_tail of 0 is an
                # infinite forward KL).
                open_bin = valid.sum(1) < V
                p_tail = torch.where(open_bin, (1.0 - lp.exp().sum(1)).clamp_min(0.0), 0.0)
                q_tail = torch.where(open_bin, (1.0 - lq.exp().sum(1)).clamp_min(0.0), 0.0)
                dt, rt = terms(p_tail.log(), q_tail.log(), opts)
                D, G = D + dt, G + rt
            if want:
                qS = lq.exp()
                if opts.bin:
                    # Outside S: q_j (g_tail - G); at S: r_j - q_j G, i.e. the tail's value
                    # plus r_j - q_j g_tail (ids are distinct: the adds do not collide).
                    g_tail = torch.where(q_tail > 0, rt / q_tail, 0.0)
                    gz = logq.exp() * (g_tail - G)[:, None]
                    fix = r - qS * g_tail[:, None]
                else:
                    gz = torch.zeros_like(logq)
                    fix = r - qS * G[:, None]
                gz.scatter_add_(1, safe, torch.where(valid, fix, 0.0))
    rows = torch.ones(M, dtype=torch.bool, device=x.device)
    ce = None
    if target is not None:
        y = target.long()
        rows = y != opts.ignore_index
        y_ok = rows & (y >= 0) & (y < V)
        bad = (rows & ~y_ok) if bad is None else (bad | (rows & ~y_ok))
        y_safe = torch.where(y_ok, y, 0)[:, None]
        if a > 0.0:
            logq1 = logq if T == 1.0 else _log_softmax(xf, 1.0)
            ce = -logq1.gather(1, y_safe)[:, 0]
    # a = 0 or 1: the vanishing term is left out (never 0 * inf).
    if ce is None:
        row_loss = D
    elif a == 1.0:
        row_loss = ce
    else:
        row_loss = (1.0 - a) * D + a * ce
    row_loss = torch.where(rows, row_loss, 0.0)
    if bad is not None:
        row_loss = torch.where(bad, float("nan"), row_loss)
    loss.copy_(row_loss)
    if not want:
        return
    g = gz * ((1.0 - a) / T) if gz is not None else torch.zeros_like(logq)
    if ce is not None:
        g.add_(logq1.exp(), alpha=a)
        g.scatter_add_(1, y_safe, torch.full_like(y_safe, -a, dtype=acc))
    s = scale.to(acc)
    g.mul_(s[:, None] if s.dim() == 1 else s)
    g.masked_fill_(~rows[:, None], 0.0)
    if bad is not None:
        g.masked_fill_(bad[:, None], float("nan"))
    grad.copy_(g)


def run_rows(
    logits: Tensor,
    teacher_logits: Tensor | None,
    teacher_ids: Tensor | None,
    teacher_log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    loss: Tensor,
    grad: Tensor | None = None,
    scale: Tensor | None = None,
) -> None:
    """Fills the (M,) row losses and, with ``grad``, the (M, V) scaled gradient rows.

    Args:
        logits: (M, V) student logits, unit stride along V.
        teacher_logits: (M, V) dense teacher logits, or None.
        teacher_ids: (M, k) int64 ids (-1: padding), or None.
        teacher_log_probs: (M, k) the teacher's log-probabilities at those ids, or None.
        target: (M,) class indices, or None (every row counts, no hard part).
        opts: the distillation options (all but the reduction are read).
        loss: (M,) output, accumulation dtype.
        grad: (M, V) output (may be ``logits`` itself), or None.
        scale: () or (M,) factor of the gradient rows; required with ``grad``.
    """
    M, V = logits.shape
    if M == 0:
        return
    block = M
    if logits.device.type == "cpu":
        work = max(V, 1) * torch.finfo(accumulation_dtype(logits.dtype)).bits // 8
        block = max(1, CPU_ROW_BLOCK_BYTES // work)
    per_row = scale is not None and scale.dim() == 1
    for r0 in range(0, M, block):
        r = slice(r0, min(M, r0 + block))
        _rows(
            logits[r],
            teacher_logits[r] if teacher_logits is not None else None,
            teacher_ids[r] if teacher_ids is not None else None,
            teacher_log_probs[r] if teacher_log_probs is not None else None,
            target[r] if target is not None else None,
            opts,
            loss[r],
            grad[r] if grad is not None else None,
            scale[r] if per_row else scale,
        )
