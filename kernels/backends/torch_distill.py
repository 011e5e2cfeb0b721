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

from ..distillation.options import DistillOptions
from ..distillation.teacher import Teacher
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


def sparse_terms(
    lq: Tensor, log_probs: Tensor, valid: Tensor, opts: DistillOptions, V: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The divergence of a sparse teacher from the student's log q gathered at its ids.

    Args:
        lq: (M, k) log q_S of the student (any value where not ``valid``).
        log_probs: (M, k) the teacher's log p_S as given.
        valid: (M, k) bool, the ids that count (not the -1 pads).
        opts: the divergence, beta and tail.
        V: the number of classes (where S holds all V, the tail bin is empty).

    Returns:
        D (M,); ``outside`` (M,) or None and ``at_s`` (M, k): dD/dz_j = q_j ``outside`` for j
        outside S (None: 0, "renormalize") and ``at_s`` is added at the ids (where valid).
    """
    lq = torch.where(valid, lq, float("-inf"))
    lp = torch.where(valid, log_probs.to(lq.dtype), float("-inf"))
    if not opts.bin:
        lq, lp = _masked_log_softmax(lq, valid), _masked_log_softmax(lp, valid)
    d, r = terms(lp, lq, opts)
    d, r = torch.where(valid, d, 0.0), torch.where(valid, r, 0.0)
    D, G = d.sum(1), r.sum(1)
    if not opts.bin:
        return D, None, r - lq.exp() * G[:, None]
    # The tail bin: every class outside S, p_tail = max(0, 1 - sum p_S), and q_tail = 1 -
    # sum_S q (clamped at 0 against rounding). Where S holds all V classes the bin is empty:
    # exactly 0 for both (1 - sum would leave rounding there, and a p_tail of 1e-8 against a
    # q_tail of 0 is an infinite forward KL).
    open_bin = valid.sum(1) < V
    p_tail = torch.where(open_bin, (1.0 - lp.exp().sum(1)).clamp_min(0.0), 0.0)
    q_tail = torch.where(open_bin, (1.0 - lq.exp().sum(1)).clamp_min(0.0), 0.0)
    dt, rt = terms(p_tail.log(), q_tail.log(), opts)
    D, G = D + dt, G + rt
    # Outside S: q_j (g_tail - G); at S: r_j - q_j G, i.e. the tail's value plus
    # r_j - q_j g_tail (ids are distinct: the adds do not collide).
    g_tail = torch.where(q_tail > 0, rt / q_tail, 0.0)
    return D, g_tail - G, r - lq.exp() * g_tail[:, None]


def sparse_grad(logq: Tensor, outside: Tensor | None) -> Tensor:
    """(M, V) dD/dz off the teacher's ids: q_j ``outside`` (bin), or 0 (renormalize); the
    caller adds ``sparse_terms``' ``at_s`` at the ids."""
    return logq.exp() * outside[:, None] if outside is not None else torch.zeros_like(logq)


def mixed_loss(D: Tensor, ce: Tensor | None, a: float, rows: Tensor) -> Tensor:
    """(M,) row losses (1 - a) D + a CE of the counted ``rows``, 0 elsewhere. a = 0 or 1: the
    vanishing term is left out (never 0 * inf)."""
    if ce is None:
        row_loss = D
    elif a == 1.0:
        row_loss = ce
    else:
        row_loss = (1.0 - a) * D + a * ce
    return torch.where(rows, row_loss, 0.0)


def soft_grad(gz: Tensor | None, opts: DistillOptions, like: Tensor) -> Tensor:
    """The divergence's part (1 - a) / T dD/dz of the gradient rows (zeros of ``like`` without
    one), a new tensor the cross-entropy's part is added to."""
    if gz is None:
        return torch.zeros_like(like)
    return gz * ((1.0 - opts.hard_weight) / opts.temperature)


def scale_grad_(g: Tensor, scale: Tensor, rows: Tensor) -> None:
    """``g`` (M, V) times ``scale`` (() or (M,)), 0 on the rows not counted, in place."""
    s = scale.to(g.dtype)
    g.mul_(s[:, None] if s.dim() == 1 else s)
    g.masked_fill_(~rows[:, None], 0.0)


def _rows(
    x: Tensor,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
    out: tuple[Tensor, Tensor | None, Tensor | None],
) -> None:
    """One block of rows into ``out`` (loss, grad, scale); see the module doc."""
    loss, grad, scale = out
    M, V = x.shape
    acc = accumulation_dtype(x.dtype)
    T, a = opts.temperature, opts.hard_weight
    xf = x.to(acc)
    logq = _log_softmax(xf, T)
    want = grad is not None
    D = torch.zeros(M, dtype=acc, device=x.device)
    gz = None
    bad = None
    if a < 1.0 and teacher.logits is not None:
        logp = _log_softmax(teacher.logits.to(acc), T)
        d, r = terms(logp, logq, opts)
        D = d.sum(1)
        if want:
            gz = r - logq.exp() * r.sum(1, keepdim=True)
    elif a < 1.0:
        ids = teacher.ids
        bad = ((ids < -1) | (ids >= V)).any(1)
        valid = (ids >= 0) & (ids < V)
        safe = torch.where(valid, ids, 0)
        D, outside, at_s = sparse_terms(logq.gather(1, safe), teacher.log_probs, valid, opts, V)
        if want:
            gz = sparse_grad(logq, outside)
            gz.scatter_add_(1, safe, torch.where(valid, at_s, 0.0))
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
    row_loss = mixed_loss(D, ce, a, rows)
    if bad is not None:
        row_loss = torch.where(bad, float("nan"), row_loss)
    loss.copy_(row_loss)
    if not want:
        return
    g = soft_grad(gz, opts, logq)
    if ce is not None:
        g.add_(logq1.exp(), alpha=a)
        g.scatter_add_(1, y_safe, torch.full_like(y_safe, -a, dtype=acc))
    scale_grad_(g, scale, rows)
    if bad is not None:
        g.masked_fill_(bad[:, None], float("nan"))
    grad.copy_(g)


def run_rows(
    logits: Tensor,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
    loss: Tensor,
    grad: Tensor | None = None,
    scale: Tensor | None = None,
) -> None:
    """Fills the (M,) row losses and, with ``grad``, the (M, V) scaled gradient rows.

    Args:
        logits: (M, V) student logits, unit stride along V.
        teacher: dense (M, V) logits, or sparse (M, k) int64 ids (-1: padding) with the
            teacher's (M, k) log-probabilities at those ids.
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
        out = (loss[r], grad[r] if grad is not None else None, scale[r] if per_row else scale)
        _rows(logits[r], teacher.rows(r), target[r] if target is not None else None, opts, out)
