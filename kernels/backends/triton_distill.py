"""The distillation rows as one Triton kernel (the numbers of ``torch_distill``, which it is
tested against, through the interpreter on the CPU).

One program per row of the student's logits x (M, V), with unit stride along V; the columns in
tiles of BLOCK_V:

* sweep 1: the running max and sum of exp of z = x / T (m, log_sum), of the raw logits where the
  cross-entropy part needs them at T = 1 and T != 1, and of a dense teacher's t / T beside them
  (the teacher's tile is loaded next to the student's; nothing of it is stored);
* a dense teacher: a sweep for D and G = sum_j q_j g_j (reverse KL and JSD, whose gradient reads
  G), then the gradient sweep; the forward KL has G = -sum p = -1, so its loss is summed in the
  gradient sweep (two sweeps, as the cross-entropy's);
* a sparse teacher: O(k) gathers of z at the ids give log q_S from (m, log_sum), then D, G and
  the tail's g in registers; the gradient sweep writes the tail's value q_j (g_tail - G) (bin)
  or 0 (renormalize) everywhere, and after a barrier the k columns of S are written again with
  their own value (ids are distinct: checked before the launch).

The gradient may be written over the logits (``grad`` is ``logits``): every logit read after
the gradient sweep has been read before it.

Everything is relative to the row max, as in the cross-entropy: log q = (z - m) - log_sum.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..distillation.options import DistillOptions
from ..distillation.teacher import Teacher
from .grid import next_pow2

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _terms(logp, logq, beta, DIV: tl.constexpr):
    """(d, r) of one support element: the loss is sum d and r = q dD/dq (see
    ``torch_distill.terms``); 0 log 0 = 0."""
    if DIV == 0:
        p = tl.exp(logp)
        d = tl.where(p > 0, p * (logp - logq), 0.0)
        r = -p
    elif DIV == 1:
        q = tl.exp(logq)
        d = tl.where(q > 0, q * (logq - logp), 0.0)
        r = tl.where(q > 0, d + q, 0.0)
    else:
        p = tl.exp(logp)
        q = tl.exp(logq)
        u = logp + tl.log(beta)
        v = logq + tl.log(1.0 - beta)
        mx = tl.maximum(u, v)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        logm = mx + tl.log(tl.exp(u - mx) + tl.exp(v - mx))
        # beta = 0 (m = q) or 1 (m = p): the vanishing term is left out, never 0 * inf.
        kq = tl.where((q > 0) & (beta < 1.0), q * (logq - logm), 0.0)
        kp = tl.where((p > 0) & (beta > 0.0), p * (logp - logm), 0.0)
        d = beta * kp + (1.0 - beta) * kq
        r = (1.0 - beta) * kq
    return d, r


@triton.jit
def _online(m, s, v):
    """One tile of an online log-sum-exp: the running max m and sum s of exp(v - m)."""
    m_new = tl.maximum(m, tl.max(v, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(v - m_safe), axis=0)
    return m_new, s


@triton.jit
def _row_sweep(
    x_row, t_row, V, inv_t, RAW: tl.constexpr, DENSE: tl.constexpr, BLOCK_V: tl.constexpr
):
    """Sweep 1 of one row (or of its vocabulary slice): the running (max, sum of exp(. - max))
    of z = x / T, of the raw x where ``RAW`` (the cross-entropy at T != 1) and of a dense
    teacher's t / T where ``DENSE``: (m, s, m1, s1, mt, st), (-inf, 0) for what is not swept."""
    neg_inf = tl.full([1], float("-inf"), tl.float32)
    zero = tl.zeros([1], tl.float32)
    m, s, m1, s1, mt, st = neg_inf, zero, neg_inf, zero, neg_inf, zero
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m, s = _online(m, s, x * inv_t)
        if RAW:
            m1, s1 = _online(m1, s1, x)
        if DENSE:
            t = tl.load(t_row + cols, mask=ok, other=float("-inf"))
            mt, st = _online(mt, st, t.to(tl.float32) * inv_t)
    return m, s, m1, s1, mt, st


@triton.jit
def _dense_sums(
    x_row,
    t_row,
    V,
    inv_t,
    m,
    log_sum,
    mt,
    log_sum_t,
    beta,
    DIV: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(D, G) of one row of a dense teacher over its V columns: the sums of d and r
    (``_terms``), log q and log p relative to the given (max, log-sum) of z = x / T and t / T
    (the whole row's, or a vocabulary slice's share of them under the global statistics)."""
    D = tl.zeros([1], tl.float32)
    G = tl.zeros([1], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=ok, other=float("-inf"))
        logq = (x * inv_t - m) - log_sum
        logp = (t.to(tl.float32) * inv_t - mt) - log_sum_t
        d, r = _terms(logp, logq, beta, DIV)
        D += tl.sum(tl.where(ok, d, 0.0), axis=0)
        G += tl.sum(tl.where(ok, r, 0.0), axis=0)
    return D, G


@triton.jit
def _distill_kernel(
    x_ptr,
    stride_x,
    t_ptr,
    stride_t,
    ids_ptr,
    lp_ptr,
    target_ptr,
    loss_ptr,
    grad_ptr,
    stride_g,
    scale_ptr,
    V,
    K,
    ignore_index,
    inv_t,
    beta,
    hard,
    DIV: tl.constexpr,
    DENSE: tl.constexpr,
    BIN: tl.constexpr,
    SOFT: tl.constexpr,
    HARD: tl.constexpr,
    HARD_STATS: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    PER_ROW_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row: loss (and the scaled gradient row); see the module doc. SOFT: the divergence
    has weight 1 - hard > 0; HARD: the cross-entropy has weight hard > 0; HARD_STATS: it needs
    the raw logits' own (m1, log_sum1) (T != 1; at T = 1 they are the student's)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    one = tl.arange(0, 1)
    zero = tl.zeros([1], tl.float32)
    counted = one == 0
    bad = one != 0
    y = 0
    if HAS_TARGET:
        y = tl.load(target_ptr + row)
        counted = counted & (y != ignore_index)
        bad = bad | (counted & ((y < 0) | (y >= V)))
        y = tl.where((y >= 0) & (y < V), y, 0)

    # Sweep 1: (m, s) of z = x / T, (m1, s1) of x (the cross-entropy, T != 1), (mt, st) of t / T.
    t_row = t_ptr + row * stride_t
    m, s, m1, s1, mt, st = _row_sweep(x_row, t_row, V, inv_t, HARD_STATS, DENSE and SOFT, BLOCK_V)
    m = tl.where(m == float("-inf"), 0.0, m)
    log_sum = tl.log(s)
    if HARD_STATS:
        m1 = tl.where(m1 == float("-inf"), 0.0, m1)
        log_sum1 = tl.log(s1)
    else:
        m1 = m
        log_sum1 = log_sum
    mt = tl.where(mt == float("-inf"), 0.0, mt)
    log_sum_t = tl.log(st)
    # Every gathered logit is read before the gradient sweep: the gradient may be written over
    # the logits (the fused head does so).
    x_y = zero
    if HARD:
        x_y += tl.load(x_row + y).to(tl.float32)

    D = zero
    G = zero
    g_tail = zero
    if SOFT:
        if DENSE:
            if DIV == 0:
                G = zero - 1.0  # -sum p: D is summed in the gradient sweep
            else:
                t_row = t_ptr + row * stride_t
                D, G = _dense_sums(
                    x_row, t_row, V, inv_t, m, log_sum, mt, log_sum_t, beta, DIV, BLOCK_V
                )
        else:
            offs = tl.arange(0, BLOCK_K)
            kin = offs < K
            ids = tl.load(ids_ptr + row * K + offs, mask=kin, other=-1)
            bad = bad | (tl.sum(tl.where(kin & ((ids < -1) | (ids >= V)), 1, 0), axis=0) > 0)
            valid = kin & (ids >= 0) & (ids < V)
            x_s = tl.load(x_row + ids, mask=valid, other=float("-inf")).to(tl.float32)
            z_s = x_s * inv_t
            lq = tl.where(valid, (z_s - m) - log_sum, float("-inf"))
            lp = tl.load(lp_ptr + row * K + offs, mask=valid, other=float("-inf"))
            lp = tl.where(valid, lp.to(tl.float32), float("-inf"))
            if not BIN:
                # Renormalised over S: log-softmax over the valid entries, from their max.
                mq = tl.max(lq, axis=0)
                mq = tl.where(mq == float("-inf"), 0.0, mq)
                lq = tl.where(valid, (lq - mq) - tl.log(tl.sum(tl.exp(lq - mq), axis=0)), lq)
                mp = tl.max(lp, axis=0)
                mp = tl.where(mp == float("-inf"), 0.0, mp)
                lp = tl.where(valid, (lp - mp) - tl.log(tl.sum(tl.exp(lp - mp), axis=0)), lp)
            d, r = _terms(lp, lq, beta, DIV)
            D += tl.sum(tl.where(valid, d, 0.0), axis=0)
            G += tl.sum(tl.where(valid, r, 0.0), axis=0)
            if BIN:
                # The tail bin; exactly empty where S holds all V classes.
                open_bin = tl.sum(tl.where(valid, 1, 0), axis=0) < V
                p_tail = tl.maximum(1.0 - tl.sum(tl.exp(lp), axis=0), 0.0)
                q_tail = tl.maximum(1.0 - tl.sum(tl.exp(lq), axis=0), 0.0)
                p_tail = tl.where(open_bin, p_tail, 0.0) + zero
                q_tail = tl.where(open_bin, q_tail, 0.0) + zero
                dt, rt = _terms(tl.log(p_tail), tl.log(q_tail), beta, DIV)
                D += dt
                G += rt
                g_tail = tl.where(q_tail > 0, rt / tl.where(q_tail > 0, q_tail, 1.0), 0.0)

    # The gradient's factors: the divergence's (1 - a) / T and the cross-entropy's a, times the
    # row's scale; 0 on rows that are not counted.
    if PER_ROW_SCALE:
        f = tl.load(scale_ptr + row + one).to(tl.float32)
    else:
        f = tl.load(scale_ptr + one).to(tl.float32)
    f = tl.where(counted, f, 0.0)
    fd = f * ((1.0 - hard) * inv_t)
    fh = f * hard
    if WRITE_GRAD or (SOFT and DENSE and DIV == 0):
        g_row = grad_ptr + row * stride_g
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
            logq = (x * inv_t - m) - log_sum
            q = tl.exp(logq)
            g = tl.zeros([BLOCK_V], tl.float32)
            if SOFT:
                if DENSE:
                    t = tl.load(t_ptr + row * stride_t + cols, mask=ok, other=float("-inf"))
                    logp = (t.to(tl.float32) * inv_t - mt) - log_sum_t
                    d, r = _terms(logp, logq, beta, DIV)
                    if DIV == 0:
                        D += tl.sum(tl.where(ok, d, 0.0), axis=0)
                    g = fd * (r - q * G)
                elif BIN:
                    g = fd * (q * (g_tail - G))
            if HARD:
                q1 = tl.exp((x - m1) - log_sum1)
                g += fh * (q1 - tl.where(cols == y, 1.0, 0.0))
            if WRITE_GRAD:
                g = tl.where(bad, float("nan"), g)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)
        if WRITE_GRAD and SOFT and not DENSE:
            # The k columns of S again, with their own value (after every thread's store).
            tl.debug_barrier()
            q_s = tl.exp(lq)
            g_s = fd * (r - q_s * G)
            if HARD:
                g_s += fh * (tl.exp((x_s - m1) - log_sum1) - tl.where(ids == y, 1.0, 0.0))
            g_s = tl.where(bad, float("nan"), g_s)
            tl.store(g_row + ids, g_s.to(grad_ptr.dtype.element_ty), mask=valid)

    loss = zero
    if SOFT:
        loss += (1.0 - hard) * D
    if HARD:
        loss += hard * ((m1 - x_y) + log_sum1)
    loss = tl.where(counted, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + row + one, loss)


def launch_config(V: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_K, num_warps): 4096-column tiles with 8 warps on the GPU (the
    cross-entropy's two-sweep choice for half precision), 1024 under the interpreter (a prime
    above it tests the multi-tile path cheaply)."""
    cap = 1024 if _INTERPRETED else 4096
    block_v = min(next_pow2(max(V, 1)), cap)
    block_k = next_pow2(max(K, 1))
    return block_v, block_k, 8 if block_v >= 2048 else 4


def run_rows(
    logits: torch.Tensor,
    teacher: Teacher,
    target: torch.Tensor | None,
    opts: DistillOptions,
    loss: torch.Tensor,
    grad: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """``torch_distill.run_rows`` as one launch (same arguments; ids, log-probabilities and the
    target contiguous)."""
    M, V = logits.shape
    if M == 0:
        return
    teacher_logits, teacher_ids, teacher_log_probs = teacher
    dense = teacher_logits is not None
    K = 1 if dense else teacher_ids.shape[1]
    block_v, block_k, warps = launch_config(V, K)
    a = opts.hard_weight
    has_target = target is not None
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=logits.device)
    scale = scale.float().contiguous()
    # The forward KL's dense loss is summed in its gradient sweep: without a gradient buffer
    # that sweep reads the logits and stores nothing.
    write_grad = grad is not None
    _distill_kernel[(M,)](
        logits,
        logits.stride(0),
        teacher_logits if dense else logits,
        teacher_logits.stride(0) if dense else 0,
        teacher_ids if not dense else logits,
        teacher_log_probs if not dense else logits,
        target if has_target else logits,
        loss,
        grad if write_grad else logits,
        grad.stride(0) if write_grad else 0,
        scale,
        V,
        K,
        opts.ignore_index,
        1.0 / opts.temperature,
        opts.beta,
        a,
        DIV=opts.code,
        DENSE=dense,
        BIN=opts.bin,
        SOFT=a < 1.0,
        HARD=a > 0.0 and has_target,
        HARD_STATS=a > 0.0 and has_target and opts.temperature != 1.0,
        HAS_TARGET=has_target,
        WRITE_GRAD=write_grad,
        PER_ROW_SCALE=scale.dim() == 1,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=warps,
    )
