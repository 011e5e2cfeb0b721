"""The Triton side of ``token_log_probs``' backward: one gradient pass over the logits that folds
the upstream gradients of both outputs (the log-probability and the entropy) into each row.

Imported by ``log_probs.rows`` only where ``backends`` found Triton. The forward pass needs no
kernel of its own: the row contract's kernel (``triton_kernels``) already writes each row's max,
log-sum, loss (-log q_y) and, with its extras, the entropy.

Per row (z = x / T, m its max, log_sum = log sum_c exp(z_c - m), H the entropy, log q_c =
(z_c - m) - log_sum, from the row max: shift-exact), for upstream gradients g_lp of
log q_y and g_H of H:

    d/dx_c = (g_lp * ([c == y] - q_c) + g_H * q_c * (-log q_c - H)) / T
           = (q_c * (c0 - g_H * log q_c) + g_lp * [c == y]) / T,   c0 = -g_lp - g_H * H,

with q_c * log q_c taken as 0 where q_c is 0 (its limit; also for logits of -inf). A row whose
target is ``ignore_index`` gets an exact 0 (also with NaN logits); an out-of-range index (with the
range check off) a row of NaN. ``col_offset`` places a vocabulary slice: column c of the slice is
the global class ``col_offset + c``, and its statistics are those of the whole row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import next_pow2


@triton.jit
def _log_prob_grad_kernel(
    logits_ptr,
    stride_logits,
    grad_ptr,
    stride_grad,
    target_ptr,
    max_ptr,
    log_sum_ptr,
    entropy_ptr,
    g_lp_ptr,
    g_h_ptr,
    V,
    vocab,
    col_offset,
    ignore_index,
    inv_temperature,
    HAS_G_LP: tl.constexpr,
    HAS_G_H: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: the row's gradient in tiles of BLOCK_V columns (one read of the
    logits, one write of the gradient; no reduction, the row statistics are given)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    y = tl.load(target_ptr + row).to(tl.int64)
    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= vocab))
    local = y - col_offset
    m = tl.load(max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + row).to(tl.float32)
    else:
        g_lp = 0.0
    if HAS_G_H:
        g_h = tl.load(g_h_ptr + row).to(tl.float32)
        c0 = -g_lp - g_h * tl.load(entropy_ptr + row)
    else:
        g_h = 0.0
        c0 = -g_lp
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SCALE:
            z = z * inv_temperature
        log_q = (z - m) - log_sum
        q = tl.exp(log_q)
        if HAS_G_H:
            # q log q -> 0 as q -> 0: never 0 * inf at a logit of -inf.
            g = tl.where(q > 0.0, q * (c0 - g_h * log_q), 0.0)
        else:
            g = q * c0
        if HAS_G_LP:
            # Added in float32 before the one rounding to the output dtype.
            g += tl.where(cols == local, g_lp, 0.0)
        if HAS_SCALE:
            g = g * inv_temperature
        g = tl.where(valid, g, 0.0)
        g = tl.where(bad, float("nan"), g)
        tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def block_v(V: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps): the tile width of one program's loop over its row. 4096 columns and
    8 warps streamed at copy speed for the row-scaling kernel of the same shape on the GPU; the
    interpreter takes smaller tiles so that the CPU suite runs several tiles per row."""
    cap = 4096 if on_gpu else 256
    block = min(next_pow2(max(V, 1)), cap)
    return block, 8 if block >= 4096 else 4


def log_prob_grad_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats_max: torch.Tensor,
    stats_log_sum: torch.Tensor,
    stats_entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    out: torch.Tensor,
    ignore_index: int,
    inv_temperature: float,
    col_offset: int,
    vocab: int,
) -> None:
    """Launches ``_log_prob_grad_kernel``: writes the (M, V) gradient into ``out``.

    Args:
        logits: (M, V) float32 / float16 / bfloat16, unit stride along V.
        target: (M,) contiguous global class indices (int32 / int64).
        stats_max, stats_log_sum: (M,) float32 row max and log-sum of the whole row's z.
        stats_entropy: (M,) float32 entropy of the row (read with ``grad_entropy``).
        grad_logp, grad_entropy: (M,) float32 contiguous upstream gradients, or None (zero).
        out: (M, V) gradient in the logits' dtype, unit stride along V (may be ``logits``).
        ignore_index, inv_temperature, col_offset, vocab: see the module doc.
    """
    M, V = logits.shape
    if M == 0 or V == 0:
        return
    block, warps = block_v(V, logits.is_cuda)
    dummy = stats_max
    _log_prob_grad_kernel[(M,)](
        logits,
        logits.stride(0),
        out,
        out.stride(0),
        target,
        stats_max,
        stats_log_sum,
        stats_entropy if stats_entropy is not None else dummy,
        grad_logp if grad_logp is not None else dummy,
        grad_entropy if grad_entropy is not None else dummy,
        V,
        vocab,
        col_offset,
        ignore_index,
        inv_temperature,
        HAS_G_LP=grad_logp is not None,
        HAS_G_H=grad_entropy is not None,
        HAS_SCALE=inv_temperature != 1.0,
        BLOCK_V=block,
        num_warps=warps,
    )
