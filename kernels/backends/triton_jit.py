"""The Triton backend's ``@triton.jit`` code: cross-entropy loss and its gradient in one launch
(``_cross_entropy_kernel``), its tile helpers and the one-program kernels around it (the mean
scale with the index check, the row sum, the row scaling).

``triton_kernels.py`` launches them (the backend's functions); it and this module are the only
ones that import Triton. Kernels added beside these import the tile helpers from here:
``_row_tile``, ``_load_tile``, ``_transform``, ``_tanh``, ``_target_coefs``, ``_tile_gradient``,
``_tile_argmax`` (``triton_kernels`` re-exports them).

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

import triton
import triton.language as tl


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
def _load_tile(
    row_ptr,
    cols,
    mask,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """z of a tile of logits: the rows' columns ``cols`` (-inf outside ``mask``) in float32,
    through ``_transform``."""
    x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf"))
    return _transform(x.to(tl.float32), mask, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)


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
    eps = label_smoothing

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
        x = _load_tile(logits_row, cols, mask, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        if SOFT_OR_SMOOTH:
            b = _target_coefs(target_row, weight_ptr, cols, mask, eps, V, HAS_WEIGHT, SOFT_TARGET)
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
                xt = _load_tile(
                    logits_row, cols, mask, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP
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
                        target_row, weight_ptr, cols, mask, eps, V, HAS_WEIGHT, SOFT_TARGET
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
        # One tile at a time: the row kept in registers (SINGLE_TILE: one iteration, whose
        # constant bound compiles to no loop), or sweep 2, which re-reads the row (mostly from
        # L2 after sweep 1) and writes the gradient.
        for start in range(0, 1 if SINGLE_TILE else V, BLOCK_V):
            if not SINGLE_TILE:
                cols, mask = _row_tile(start, row_ok, V, BLOCK_V)
                x = _load_tile(
                    logits_row, cols, mask, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP
                )
                if SOFT_OR_SMOOTH:
                    b = _target_coefs(
                        target_row, weight_ptr, cols, mask, eps, V, HAS_WEIGHT, SOFT_TARGET
                    )
                else:
                    b = x  # unused
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
