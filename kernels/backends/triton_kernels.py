"""The Triton backend: cross-entropy loss and its gradient in one launch, and its helpers.

The only module that imports Triton (``backends`` imports it where Triton is installed). Its
``mean_scale``, ``reduce_rows`` and ``scale_rows_`` are the backend's side of the reductions
around the rows: one-program kernels up to ``ONE_PROGRAM_ROWS`` rows, torch's reductions
(``torch_ops``) past it.

Layout: logits are a 2-D (M, V) view with unit stride along V (any row stride). One program owns
BLOCK_M whole rows. For each row it computes the log-sum-exp with an online (running max) softmax
and, when asked, writes the gradient of the row's loss in the same launch:

* ``SINGLE_TILE`` (V <= BLOCK_V): the row tile stays in registers, so the logits are read once and
  the gradient written once -- the memory-traffic floor.
* otherwise two sweeps over the row: the first reduces, the second re-reads the logits (usually
  from L2) and writes the gradient.

Per-row loss (w = class weights or 1, eps = label smoothing, C = V, lse = log-sum-exp):

* class indices:  (1 - eps) * w_y * (lse - x_y) + eps / C * (sum_c w_c * lse - sum_c w_c x_c)
* probabilities:  sum_c w_c t'_c (lse - x_c) with t' = (1 - eps) t + eps / C

and the gradient of ``scale * loss`` with respect to x_j is ``scale * (a * p_j - b_j)`` with
p = softmax(x), a = sum of the coefficients of lse, b_j the coefficient of x_j. ``scale`` is read
from device memory (1 / normaliser of a mean, or one upstream factor per row) so that nothing on
the host waits for the GPU. The forward pass also stores each row's max m, log-sum and a: from
them a later launch writes the gradient alone (one read of the logits, one write, no reduction
sweep).

Everything is computed relative to the row max m (shift-exact, as torch's ``log_softmax``): with
lse = m + log_sum, the loss is a * log_sum + hard * (m - x_y) - sum_c b_c (x_c - m) and p_j is
exp((x_j - m) - log_sum). Forming lse and subtracting x_y from it instead would lose every digit
of the answer once |m| is large (at an offset of 1e8 the float32 spacing is 8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from ..stat_rows import COEF, CORRECT, ENTROPY, LOG_SUM, LOSS, MAX, Z_PART
from . import torch_ops

# Up to this many rows, one Triton program computes the mean scale (with the index check) and
# the final sum in a single launch each; past it, torch's multi-block reductions finish sooner
# than one program looping over all rows. A guess to be tuned on the GPU (docs/KERNEL_NOTES.md).
ONE_PROGRAM_ROWS = 16384


@triton.jit
def _row_tile(start, row_ok, V, BLOCK_V: tl.constexpr):
    """Columns [start, start + BLOCK_V) of BLOCK_M rows: (column indices, in-bounds mask)."""
    cols = start + tl.arange(0, BLOCK_V)
    mask = row_ok[:, None] & (cols < V)[None, :]
    return cols, mask


@triton.jit
def _target_coefs(
    target_row,
    weight_ptr,
    cols,
    mask,
    label_smoothing,
    V,
    HAS_WEIGHT: tl.constexpr,
    SOFT_TARGET: tl.constexpr,
):
    """The tile's coefficients b_c of x_c in the loss, apart from the true-class term:
    w_c * ((1 - eps) * t_c + eps / C) for probabilities, w_c * eps / C for class indices."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=cols < V, other=0.0)[None, :]
    else:
        w = tl.where(mask, 1.0, 0.0)
    smooth = label_smoothing / V
    if SOFT_TARGET:
        t = tl.load(target_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        return w * ((1.0 - label_smoothing) * t + smooth)
    return tl.where(mask, w * smooth, 0.0)


@triton.jit
def _transform(
    x, mask, logit_scale, softcap, HAS_LOGIT_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr
):
    """z = softcap(logit_scale * x) for a float32 tile; masked-out columns stay -inf."""
    if HAS_LOGIT_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
        x = tl.where(mask, x, float("-inf"))
    return x


@triton.jit
def _tanh(u):
    """tanh in float32 to about an ulp everywhere (Triton has no tanh the interpreter runs).

    |u| < 0.5: the odd Taylor series to u**17 (each term about 0.1x the last: truncation below
    1e-9 relative). Beyond: sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 0.37, where 1 - e
    does not cancel, and which is exactly +-1 for large |u| (never inf / inf). The form
    1 - 2 / (exp(2u) + 1) cancels for small |u|: 4e-6 relative error at logits of a few units
    under a cap of 30.
    """
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    p = 6404582.0 / 10854718875.0
    p = p * u2 - 929569.0 / 638512875.0
    p = p * u2 + 21844.0 / 6081075.0
    p = p * u2 - 1382.0 / 155925.0
    p = p * u2 + 62.0 / 2835.0
    p = p * u2 - 17.0 / 315.0
    p = p * u2 + 2.0 / 15.0
    p = p * u2 - 1.0 / 3.0
    small = u + u * (u2 * p)
    return tl.where(a < 0.5, small, tl.where(u < 0.0, -big, big))


@triton.jit
def _tile_gradient(
    z,
    cols,
    b,
    m,
    log_sum,
    a_s,
    s,
    y,
    hard_s,
    valid,
    logit_scale,
    softcap,
    SOFT_OR_SMOOTH: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """scale * d loss / d x for one tile: (a * scale * softmax(z) - scale * b - [c == y] * hard)
    times dz/dx (logit_scale, and 1 - tanh**2 = 1 - (z / c)**2 under a softcap c); softmax(z)
    from the row max m: exp((z - m) - log_sum)."""
    g = a_s[:, None] * tl.exp((z - m[:, None]) - log_sum[:, None])
    if SOFT_OR_SMOOTH:
        g -= s[:, None] * b
    # The true-class term is subtracted in float32, before the one cast to the output dtype.
    g -= tl.where(cols[None, :] == y[:, None], hard_s[:, None], 0.0)
    if HAS_SOFTCAP:
        th = z / softcap
        g = g * (1.0 - th * th)
    if HAS_LOGIT_SCALE:
        g = g * logit_scale
    return tl.where(valid[:, None], g, 0.0)


@triton.jit
def _tile_argmax(v, vmax, cols, V):
    """Per row, the first column where the tile ``v`` reaches its maximum ``vmax``."""
    return tl.min(tl.where(v == vmax[:, None], cols[None, :], V), axis=1)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    stride_logits,
    grad_ptr,
    stride_grad,
    target_ptr,
    stride_target,
    weight_ptr,
    loss_ptr,
    max_ptr,
    log_sum_ptr,
    coef_ptr,
    scale_ptr,
    token_weight_ptr,
    z_part_ptr,
    entropy_ptr,
    correct_ptr,
    M,
    V,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    z_loss,
    HAS_WEIGHT: tl.constexpr,
    SOFT_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    PER_ROW_SCALE: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_TOKEN_WEIGHT: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Forward (WRITE_LOSS): per-row loss, max, log-sum and lse coefficient, and with WRITE_GRAD
    the gradient in the same launch. Gradient only (not WRITE_LOSS): from the saved per-row
    max, log-sum and coefficient, one read of the logits and one write of the gradient.

    The options are constexpr flags, so that a call without them compiles to the plain kernel:
    HAS_LOGIT_SCALE / HAS_SOFTCAP (the loss sees z = softcap(logit_scale * x)), HAS_Z_LOSS
    (+ z_loss * lse**2 per non-ignored row), HAS_TOKEN_WEIGHT (each row's loss and gradient
    times its token weight), WRITE_STATS (the z-loss part, the entropy and whether the argmax
    is right, from online reductions next to the running max and sum)."""
    pid = tl.program_id(0)
    rows = tl.cast(pid, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    # int64 row offsets: M * V can exceed 2**31 elements.
    logits_row = logits_ptr + rows * stride_logits
    target_row = target_ptr + rows * stride_target
    SOFT_OR_SMOOTH: tl.constexpr = SOFT_TARGET or HAS_SMOOTHING

    if SOFT_TARGET:
        valid = row_ok
        bad = rows < 0  # never: probabilities have no index to check
        y = rows * 0 - 1  # no column is the true class
        y_ok = bad
        hard = tl.zeros([BLOCK_M], tl.float32)
    else:
        y = tl.load(target_row, mask=row_ok, other=0).to(tl.int64)
        valid = row_ok & (y != ignore_index)
        # Out-of-range indices are rejected on the host; if that check is switched off they give
        # NaN here, never an out-of-bounds load.
        y_ok = valid & (y >= 0) & (y < V)
        bad = valid & ~y_ok
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y, mask=y_ok, other=0.0)
        else:
            w_y = tl.where(y_ok, 1.0, 0.0)
        hard = (1.0 - label_smoothing) * w_y

    if SINGLE_TILE:
        # The whole row fits one tile: read it once, keep it in registers for the gradient.
        cols, mask = _row_tile(0, row_ok, V, BLOCK_V)
        x = tl.load(logits_row[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        x = _transform(x.to(tl.float32), mask, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        if SOFT_OR_SMOOTH:
            b = _target_coefs(
                target_row, weight_ptr, cols, mask, label_smoothing, V, HAS_WEIGHT, SOFT_TARGET
            )
        else:
            b = x  # unused: no coefficient besides the true class

    if WRITE_LOSS:
        if SINGLE_TILE:
            m = tl.max(x, axis=1)
            # An all -inf row: keep exp() finite (exp(-inf - -inf) would be NaN).
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            s = tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            if SOFT_OR_SMOOTH:
                # lin = sum_c b_c (x_c - m); 0 * log(0) counts as 0 (its limit), also where a
                # logit is -inf.
                lin = tl.sum(tl.where(b != 0.0, b * (x - m_safe[:, None]), 0.0), axis=1)
                a = tl.sum(b, axis=1)
            else:
                lin = tl.zeros([BLOCK_M], tl.float32)
                a = tl.zeros([BLOCK_M], tl.float32)
            if WRITE_STATS:
                # q = sum exp(z - m) (z - m): the entropy is log(s) - q / s.
                d = x - m_safe[:, None]
                q = tl.sum(tl.where(x > float("-inf"), tl.exp(d) * d, 0.0), axis=1)
                pred = _tile_argmax(x, m, cols, V)
                if SOFT_TARGET:
                    t = tl.load(target_row[:, None] + cols[None, :], mask=mask, other=0.0)
                    t = tl.where(mask, t.to(tl.float32), float("-inf"))
                    t_pred = _tile_argmax(t, tl.max(t, axis=1), cols, V)
        else:
            # Sweep 1: running max m and running sum of exp(x - m) (online softmax); lin is
            # sum_c b_c (x_c - m_safe) relative to the running max, moved with it.
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            m_safe = tl.zeros([BLOCK_M], tl.float32)
            s = tl.zeros([BLOCK_M], tl.float32)
            lin = tl.zeros([BLOCK_M], tl.float32)
            a = tl.zeros([BLOCK_M], tl.float32)
            if WRITE_STATS:
                q = tl.zeros([BLOCK_M], tl.float32)
                pred = tl.zeros([BLOCK_M], tl.int32)
                t_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
                t_pred = tl.zeros([BLOCK_M], tl.int32)
            for start in range(0, V, BLOCK_V):
                cols, mask = _row_tile(start, row_ok, V, BLOCK_V)
                xt = tl.load(logits_row[:, None] + cols[None, :], mask=mask, other=float("-inf"))
                xt = _transform(
                    xt.to(tl.float32), mask, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP
                )
                tile_max = tl.max(xt, axis=1)
                m_new = tl.maximum(m, tile_max)
                m_prev = m_safe
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                if WRITE_STATS:
                    # Online entropy and argmax next to the running max and sum: rescale q to
                    # the new max; a strictly larger tile max moves the argmax (first maximum).
                    d = xt - m_safe[:, None]
                    shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
                    q_tile = tl.sum(tl.where(xt > float("-inf"), tl.exp(d) * d, 0.0), axis=1)
                    q = tl.exp(m - m_safe) * (q + shift * s) + q_tile
                    pred = tl.where(tile_max > m, _tile_argmax(xt, tile_max, cols, V), pred)
                    if SOFT_TARGET:
                        tt = tl.load(target_row[:, None] + cols[None, :], mask=mask, other=0.0)
                        tt = tl.where(mask, tt.to(tl.float32), float("-inf"))
                        tt_max = tl.max(tt, axis=1)
                        tt_pred = _tile_argmax(tt, tt_max, cols, V)
                        t_pred = tl.where(tt_max > t_max, tt_pred, t_pred)
                        t_max = tl.maximum(t_max, tt_max)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(xt - m_safe[:, None]), axis=1)
                m = m_new
                if SOFT_OR_SMOOTH:
                    bt = _target_coefs(
                        target_row,
                        weight_ptr,
                        cols,
                        mask,
                        label_smoothing,
                        V,
                        HAS_WEIGHT,
                        SOFT_TARGET,
                    )
                    # Move the earlier terms to the new max, then add the tile's.
                    lin += tl.where(a != 0.0, a * (m_prev - m_safe), 0.0)
                    lin += tl.sum(tl.where(bt != 0.0, bt * (xt - m_safe[:, None]), 0.0), axis=1)
                    a += tl.sum(bt, axis=1)
        log_sum = tl.log(s)
        lse = m_safe + log_sum
        x_y = tl.load(logits_row + y, mask=y_ok, other=0.0).to(tl.float32)
        x_y = _transform(x_y, row_ok, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        a = tl.where(valid, a + hard, 0.0)
        # a * lse - hard * x_y - sum_c b_c x_c, regrouped around the row max (no lse formed).
        loss = tl.where(valid, a * log_sum + hard * (m_safe - x_y) - lin, 0.0)
        if HAS_Z_LOSS:
            z_part = tl.where(valid, z_loss * lse * lse, 0.0)
            loss += z_part
        else:
            z_part = tl.zeros([BLOCK_M], tl.float32)
        if HAS_TOKEN_WEIGHT:
            t_w = tl.load(token_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            loss *= t_w
            z_part *= t_w
        loss = tl.where(bad, float("nan"), loss)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(max_ptr + rows, m_safe, mask=row_ok)
        tl.store(log_sum_ptr + rows, log_sum, mask=row_ok)
        tl.store(coef_ptr + rows, a, mask=row_ok)
        if WRITE_STATS:
            tl.store(z_part_ptr + rows, z_part, mask=row_ok)
            tl.store(entropy_ptr + rows, log_sum - q / s, mask=row_ok)
            if SOFT_TARGET:
                correct = valid & (pred == t_pred)
            else:
                correct = y_ok & (pred.to(tl.int64) == y)
            tl.store(correct_ptr + rows, correct.to(tl.float32), mask=row_ok)
    else:
        m_safe = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
        log_sum = tl.load(log_sum_ptr + rows, mask=row_ok, other=0.0)
        lse = m_safe + log_sum
        a = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)

    if WRITE_GRAD:
        if PER_ROW_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        else:
            scale = tl.zeros([BLOCK_M], tl.float32) + tl.load(scale_ptr)
        if HAS_TOKEN_WEIGHT:
            scale *= tl.load(token_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        grad_row = grad_ptr + rows * stride_grad
        if HAS_Z_LOSS:
            # d (z_loss * lse**2) / d z = 2 * z_loss * lse * softmax(z): folded into a.
            a_s = tl.where(
                bad, float("nan"), (a + tl.where(valid, 2.0 * z_loss * lse, 0.0)) * scale
            )
        else:
            a_s = tl.where(bad, float("nan"), a * scale)
        hard_s = hard * scale
        if SINGLE_TILE:
            g = _tile_gradient(
                x,
                cols,
                b,
                m_safe,
                log_sum,
                a_s,
                scale,
                y,
                hard_s,
                valid,
                logit_scale,
                softcap,
                SOFT_OR_SMOOTH,
                HAS_LOGIT_SCALE,
                HAS_SOFTCAP,
            )
            tl.store(grad_row[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # Sweep 2: re-read the row (mostly from L2 after sweep 1) and write the gradient.
            for start in range(0, V, BLOCK_V):
                cols, mask = _row_tile(start, row_ok, V, BLOCK_V)
                xt = tl.load(logits_row[:, None] + cols[None, :], mask=mask, other=float("-inf"))
                xt = _transform(
                    xt.to(tl.float32), mask, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP
                )
                if SOFT_OR_SMOOTH:
                    bt = _target_coefs(
                        target_row,
                        weight_ptr,
                        cols,
                        mask,
                        label_smoothing,
                        V,
                        HAS_WEIGHT,
                        SOFT_TARGET,
                    )
                else:
                    bt = xt  # unused
                g = _tile_gradient(
                    xt,
                    cols,
                    bt,
                    m_safe,
                    log_sum,
                    a_s,
                    scale,
                    y,
                    hard_s,
                    valid,
                    logit_scale,
                    softcap,
                    SOFT_OR_SMOOTH,
                    HAS_LOGIT_SCALE,
                    HAS_SOFTCAP,
                )
                tl.store(
                    grad_row[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask
                )


@triton.jit
def _multiply_rows_kernel(
    grad_ptr, stride_grad, factor_ptr, V, PER_ROW: tl.constexpr, BLOCK: tl.constexpr
):
    """grad[row, :] *= factor (a scalar, or one per row); a factor of exactly 1 moves no data."""
    row = tl.program_id(0)
    if PER_ROW:
        f = tl.load(factor_ptr + row).to(tl.float32)
    else:
        f = tl.load(factor_ptr).to(tl.float32)
    if f != 1.0:
        ptr = grad_ptr + tl.cast(row, tl.int64) * stride_grad
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            g = tl.load(ptr + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptr + cols, (g * f).to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mean_scale_kernel(
    target_ptr,
    stride_target,
    weight_ptr,
    scale_ptr,
    bad_ptr,
    token_weight_ptr,
    M,
    V,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    MEAN: tl.constexpr,
    SOFT_TARGET: tl.constexpr,
    CHECK: tl.constexpr,
    HAS_TOKEN_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the gradient scale (1 / torch's mean normaliser generalised to token
    weights, or 1) and the number of out-of-range class indices, so that the host needs at
    most one tiny read."""
    denom = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    n_bad = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    if SOFT_TARGET:
        if HAS_TOKEN_WEIGHT:
            for start in range(0, M, BLOCK):
                rows = start + tl.arange(0, BLOCK)
                denom += tl.sum(tl.load(token_weight_ptr + rows, mask=rows < M, other=0.0), axis=0)
        else:
            denom += M
    elif MEAN or CHECK:
        for start in range(0, M, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            ok = rows < M
            y = tl.load(target_ptr + tl.cast(rows, tl.int64) * stride_target, mask=ok, other=0)
            y = y.to(tl.int64)
            valid = ok & (y != ignore_index)
            y_ok = valid & (y >= 0) & (y < V)
            n_bad += tl.sum((valid & ~y_ok).to(tl.int32), axis=0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + y, mask=y_ok, other=0.0)
            else:
                w = tl.where(y_ok, 1.0, 0.0)
            if HAS_TOKEN_WEIGHT:
                w *= tl.load(token_weight_ptr + rows, mask=ok, other=0.0)
            denom += tl.sum(w, axis=0)
    if MEAN:
        # torch_ops.inverse_normaliser: only an exactly zero normaliser (nothing to average)
        # gives 0; a negative one (negative class weights) divides as torch does.
        scale = tl.where(denom != 0.0, 1.0 / denom, 0.0)
    else:
        scale = denom * 0.0 + 1.0
    tl.store(scale_ptr, scale)
    if CHECK:
        tl.store(bad_ptr, n_bad)


@triton.jit
def _reduce_kernel(loss_rows_ptr, scale_ptr, out_ptr, M, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: sum (times the mean scale) of the per-row losses, in a fixed order."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, M, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        acc += tl.load(loss_rows_ptr + rows, mask=rows < M, other=0.0)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total * tl.load(scale_ptr)
    tl.store(out_ptr, total)


# Largest row tile kept in registers for the one-read path, by element size (bytes). On the GPU
# float32 rows up to 32768 classes stay in registers (16 warps: 64 values a thread): on an H200 at
# 8192 x 32000 that took the forward + gradient launch from 1.39x to 1.01x the time of a copy of
# the logits. Half-precision rows that long were slower in registers than in two sweeps there
# (1.78-1.99x vs 1.60-1.62x). The interpreter keeps the smaller tiles, so that the CPU suite
# runs both paths at the shapes it tests. Numbers ("Launch configurations"; H200, torch 2.11,
# triton 3.6): benchmarks/results/nvidia-h200-2026-11-26-check.md.
_SINGLE_TILE_MAX = {1: 16384, 2: 16384, 4: 32768}
_SINGLE_TILE_MAX_INTERPRETED = {1: 16384, 2: 16384, 4: 8192}


def _launch_config(M: int, V: int, elem_size: int, interpreted: bool) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_V, SINGLE_TILE, num_warps) from the shape."""
    v_pow2 = triton.next_power_of_2(max(V, 1))
    single_max = (_SINGLE_TILE_MAX_INTERPRETED if interpreted else _SINGLE_TILE_MAX)[elem_size]
    if v_pow2 <= single_max:
        block_v = v_pow2
        # Several short rows per program so that each moves enough bytes to hide latency.
        target_elems = 1 << 14 if interpreted else 4096
        block_m = max(1, min(triton.next_power_of_2(max(M, 1)), target_elems // block_v, 64))
        num_warps = 4 if block_m * block_v <= 4096 else 8
        if block_m * block_v >= 16384:
            num_warps = 16
        return block_m, block_v, True, num_warps
    if interpreted:
        return 1, 4096, False, 16
    # Two sweeps over the row. Half precision: 4096-column tiles and 8 warps measured fastest on
    # an H200 (50257 classes: 1.63 vs 1.93 ms for 8192 columns and 16 warps; no slower at 32000
    # and 128256); float32: 8192 and 16 warps were as fast as any other choice measured.
    return (1, 4096, False, 8) if elem_size <= 2 else (1, 8192, False, 16)


def run_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    stats: torch.Tensor,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    grad_only: bool = False,
    token_weight: torch.Tensor | None = None,
) -> None:
    """Launches the fused kernel: the row contract of ``core.run_rows``, arguments checked."""
    M, V = logits.shape
    if M == 0:
        return
    interpreted = not logits.is_cuda
    block_m, block_v, single, num_warps = _launch_config(M, V, logits.element_size(), interpreted)
    write_grad = grad is not None
    write_stats = stats.shape[0] > COEF + 1 and not grad_only
    dummy = stats  # any valid pointer for arguments a specialisation never reads
    softcap = opts.softcap
    _cross_entropy_kernel[(triton.cdiv(M, block_m),)](
        logits,
        logits.stride(0),
        grad if write_grad else dummy,
        grad.stride(0) if write_grad else 0,
        target,
        target.stride(0),
        weight if weight is not None else dummy,
        stats[LOSS],
        stats[MAX],
        stats[LOG_SUM],
        stats[COEF],
        scale if write_grad else dummy,
        token_weight if token_weight is not None else dummy,
        stats[Z_PART] if write_stats else dummy,
        stats[ENTROPY] if write_stats else dummy,
        stats[CORRECT] if write_stats else dummy,
        M,
        V,
        opts.ignore_index,
        opts.label_smoothing,
        opts.logit_scale,
        softcap if softcap is not None else 1.0,
        opts.z_loss,
        HAS_WEIGHT=weight is not None,
        SOFT_TARGET=target.dim() == 2,
        HAS_SMOOTHING=opts.label_smoothing > 0.0,
        WRITE_LOSS=not grad_only,
        WRITE_GRAD=write_grad,
        PER_ROW_SCALE=write_grad and scale.dim() == 1,
        HAS_LOGIT_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_Z_LOSS=opts.z_loss > 0.0,
        HAS_TOKEN_WEIGHT=token_weight is not None,
        WRITE_STATS=write_stats,
        SINGLE_TILE=single,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def multiply_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """In place ``grad *= factor`` for a (M, V) gradient; factor is () or (M,); no host sync."""
    M, V = grad.shape
    if M == 0 or V == 0:
        return
    block = min(triton.next_power_of_2(V), 8192 if grad.is_cuda else 4096)
    per_row = factor.dim() == 1
    _multiply_rows_kernel[(M,)](
        grad,
        grad.stride(0),
        factor,
        V,
        PER_ROW=per_row,
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )


def mean_scale_and_bad_count(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    num_rows: int,
    num_classes: int,
    mean: bool,
    check: bool,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient scale (() float32) and, if ``check``, the count of bad class indices (() int32).

    Args:
        target: (M,) class indices or (M, V) probabilities.
        weight: (V,) float32 class weights or None.
        ignore_index: ignored class index.
        num_rows: M.
        num_classes: V.
        mean: reduction == "mean" (else the scale is 1).
        check: count class indices outside [0, V) that are not ignore_index.
        token_weight: (M,) float32 token weights or None (the normaliser sums t_i * w_{y_i}).
    """
    scale = torch.empty((), dtype=torch.float32, device=target.device)
    soft = target.dim() == 2
    check = check and not soft
    bad = torch.empty((), dtype=torch.int32, device=target.device) if check else None
    _mean_scale_kernel[(1,)](
        target,
        target.stride(0) if target.dim() else 0,
        weight if weight is not None else scale,
        scale,
        bad if bad is not None else scale,
        token_weight if token_weight is not None else scale,
        num_rows,
        num_classes,
        ignore_index,
        HAS_WEIGHT=weight is not None,
        MEAN=mean,
        SOFT_TARGET=soft,
        CHECK=check,
        HAS_TOKEN_WEIGHT=token_weight is not None and mean,
        BLOCK=4096 if target.is_cuda else 1024,
        num_warps=8,
    )
    return scale, bad


def sum_rows(loss_rows: torch.Tensor, scale: torch.Tensor, mean: bool) -> torch.Tensor:
    """() float32: sum of the (M,) per-row losses, times ``scale`` when ``mean``."""
    out = torch.empty((), dtype=torch.float32, device=loss_rows.device)
    _reduce_kernel[(1,)](
        loss_rows,
        scale,
        out,
        loss_rows.numel(),
        MEAN=mean,
        BLOCK=4096 if loss_rows.is_cuda else 1024,
        num_warps=8,
    )
    return out


def rows_per_call(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    stats: torch.Tensor,
    grad_only: bool,
    token_weight: torch.Tensor | None,
) -> int:
    """Every row in one launch."""
    return logits.shape[0]


def mean_scale(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    check: bool,
    token_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch_ops.mean_scale``: one tiny launch computes both the scale and the bad-index count
    (up to ``ONE_PROGRAM_ROWS`` rows)."""
    M, V = logits.shape
    if M > ONE_PROGRAM_ROWS:
        return torch_ops.mean_scale(logits, target, weight, opts, check, token_weight)
    return mean_scale_and_bad_count(
        target, weight, opts.ignore_index, M, V, opts.mean, check, token_weight
    )


def reduce_rows(loss_rows: torch.Tensor, scale: torch.Tensor, mean: bool) -> torch.Tensor:
    """``torch_ops.reduce_rows``: one program sums float32 losses in a fixed order (up to
    ``ONE_PROGRAM_ROWS`` rows)."""
    if loss_rows.dtype == torch.float32 and loss_rows.numel() <= ONE_PROGRAM_ROWS:
        return sum_rows(loss_rows, scale, mean)
    return torch_ops.reduce_rows(loss_rows, scale, mean)


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` for a () factor, no host sync: a factor of exactly 1 moves no data."""
    multiply_rows_(grad, factor.float().contiguous())
