"""Per-token log-probabilities and entropy on the row contract: the rows behind
``token_log_probs`` and ``linear_token_log_probs``.

For logits viewed as (M, V) rows, z = x / T and q = softmax(z):

* logp_i = log q_{i, y_i} is minus the row loss of the cross-entropy with ``logit_scale = 1 / T``
  and no reduction: the forward is the row contract (``core.run_rows``), which also writes each
  row's max m and log-sum (shift-exact, see ``core``). The entropy H: on the Triton backend the
  kernel's extras, in the same pass (nothing new runs forward); on the torch backend the plain
  rows and then H = log_sum - sum q (z - m) (``_torch_entropy``; compiled by Inductor on large
  CPU blocks), in fewer passes than the row contract's general path with its extras.
* The gradient of a row is (g_lp * (onehot(y) - q) + g_H * q * (-log q - H)) / T for upstream
  gradients g_lp, g_H. With g_H absent (no entropy, or an entropy that no gradient reaches) it is
  -g_lp times the cross-entropy's row gradient: the row contract's gradient-only launch
  (``core.gradient_from_stats``) writes it, per-row factor folded in. With g_H it is not one
  row factor times one tensor; one extra pass recomputes q from the saved (m, log_sum, H) and
  writes it (``backends.triton_log_probs`` on CUDA and under the interpreter; torch ops here
  otherwise, ``backends.cpu_compiled_log_probs`` on large CPU blocks, where that compiled pass
  also replaces the row contract's eager gradient-only rows). Either way backward reads the
  logits once and writes the gradient once: storing the gradient in forward instead would need
  N x V memory for each of the two terms.
* The fused head (``head``) runs these rows on each chunk of x @ W.T.

Rows whose target is ``ignore_index`` give 0 for both outputs and an exact 0 gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import backends, core
from ..backends import cpu_compiled_log_probs
from ..backends.torch_ops import CPU_COMPILED_BLOCK_BYTES
from ..index_check import DeferredIndexCheck
from ..options import LossOptions, accumulation_dtype, index_target_for_kernels
from ..stat_rows import ENTROPY, LOG_SUM, LOSS, MAX, STAT_ROWS

# Only where ``backends`` found Triton (the same condition, so that both agree).
if backends.triton_kernels is not None:
    from ..backends import triton_log_probs
else:  # pragma: no cover - depends on the platform
    triton_log_probs = None

# On the CPU the torch gradient works through rows of about this many bytes of accumulation
# values at a time, so that its few temporaries stay in cache (as ``torch_ops`` does).
CPU_ROW_BLOCK_BYTES = 2 << 20


def row_options(ignore_index: int, temperature: float) -> LossOptions:
    """The cross-entropy options whose row loss is -log q_y at temperature T."""
    return LossOptions(ignore_index=ignore_index, reduction="none", logit_scale=1.0 / temperature)


class RowsForward(NamedTuple):
    """What the forward pass over (M, V) rows leaves behind."""

    logp: Tensor  # (M,) log q_y, 0 at ignored rows
    entropy: Tensor | None  # (M,) H, 0 at ignored rows; None when not asked
    stats: Tensor  # (4, M) or (7, M) row statistics (core's rows)
    pending_check: DeferredIndexCheck | None


def flat_rows(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(M, V) logits with unit stride along V (no copy for a contiguous input; V may be 0 for
    a vocabulary slice) and (M,) class indices as the kernels read them, of (..., V) logits and
    (...) targets."""
    t = index_target_for_kernels(target.reshape(-1), ignore_index)
    x = logits.reshape(t.shape[0], logits.shape[-1])  # -1 is ambiguous for V = 0
    return (x if x.stride(-1) == 1 else x.contiguous()), t


def shaped(
    logp: Tensor, ent: Tensor | None, entropy: bool, shape: tuple[int, ...]
) -> Tensor | tuple[Tensor, Tensor]:
    """What the public functions return: ``logp`` of the target's ``shape``, with ``entropy``
    the tuple ``(logp, entropy)``."""
    if not entropy:
        return logp.reshape(shape)
    return logp.reshape(shape), ent.reshape(shape)


def outputs_from_stats(
    stats: Tensor, target: Tensor, ignore_index: int, entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """(logp, entropy or None) from the row statistics: -loss and the entropy row, 0 where the
    row is ignored (also where its logits are NaN)."""
    valid = target != ignore_index
    logp = torch.where(valid, -stats[LOSS], 0.0)
    ent = torch.where(valid, stats[ENTROPY], 0.0) if entropy else None
    return logp, ent


def rows_stats(
    logits: Tensor, target: Tensor, opts: LossOptions, entropy: bool, stats: Tensor
) -> None:
    """Fills the row statistics of (M, V) logits (no index check): the row contract's rows,
    and with ``entropy`` (7-row ``stats``) the entropy row. The Triton kernel computes the
    entropy in the same pass (its extras); on the torch backend the plain rows (Inductor-compiled
    on large CPU blocks) and then ``_torch_entropy`` take a fraction of the general path's
    time. The other extras' rows (z-loss part, correct) hold 0 or the kernel's values."""
    if entropy and not backends.uses_triton(logits):
        core.run_rows(logits, target, None, opts, stats[:STAT_ROWS])
        stats[STAT_ROWS:].zero_()  # the extras' rows no one reads: defined values all the same
        if logits.shape[0] > 0:
            _torch_entropy(logits, stats, opts)
        return
    core.run_rows(logits, target, None, opts, stats)


def forward_rows(
    logits: Tensor, target: Tensor, opts: LossOptions, entropy: bool, defer_check: bool = False
) -> RowsForward:
    """logp (and H) of (M, V) logits with unit stride along V; ``target`` (M,) class indices
    (int32 / int64). One pass of the row contract; raises IndexError for a class index out of
    range (deferred to backward on CUDA with ``defer_check``)."""
    _, pending = core.gradient_scale(logits, target, None, opts, defer_check)
    stats = core.new_stats(logits.shape[0], logits.dtype, logits.device, entropy)
    rows_stats(logits, target, opts, entropy, stats)
    logp, ent = outputs_from_stats(stats, target, opts.ignore_index, entropy)
    return RowsForward(logp, ent, stats, pending)


def _row_blocks(logits: Tensor, acc: torch.dtype, compiled: bool) -> range:
    """Starts of the row blocks the torch ops work through (all rows at once off the CPU);
    the compiled functions take larger blocks (``torch_ops.CPU_COMPILED_BLOCK_BYTES``)."""
    M, V = logits.shape
    if logits.device.type != "cpu":
        return range(0, M, max(M, 1))
    budget = CPU_COMPILED_BLOCK_BYTES if compiled else CPU_ROW_BLOCK_BYTES
    return range(0, M, max(1, budget // max(V * torch.finfo(acc).bits // 8, 1)))


# Below this log-probability q is 0 in float32 and float64 alike (exp underflows near -745):
# clamping log q there changes no q, and keeps q * log q at 0 where a logit is -inf.
_LOG_Q_FLOOR = cpu_compiled_log_probs.LOG_Q_FLOOR


def _torch_entropy(logits: Tensor, stats: Tensor, opts: LossOptions) -> None:
    """Writes ``stats[ENTROPY]`` from the logits and the rows' max and log-sum, with torch ops:
    H = log_sum - sum_c q_c (z_c - m), from the row max (shift-exact); a few passes per row
    block, against about twice as many for the row contract's general path with its extras."""
    acc = stats.dtype
    inv_t = opts.logit_scale
    M = logits.shape[0]
    compiled = cpu_compiled_log_probs.applies(logits)
    blocks = _row_blocks(logits, acc, compiled)
    for r0 in blocks:
        r = slice(r0, min(M, r0 + blocks.step))
        if compiled and cpu_compiled_log_probs.applies(logits[r]):
            h = cpu_compiled_log_probs.entropy(logits[r], stats[MAX, r], stats[LOG_SUM, r], inv_t)
            if h is not None:
                stats[ENTROPY, r] = h
                continue
        z = logits[r].to(acc)
        d = z * inv_t if inv_t != 1.0 else z.clone()
        d.sub_(stats[MAX, r, None]).clamp_(min=_LOG_Q_FLOOR)
        q = (d - stats[LOG_SUM, r, None]).exp_()
        # A batched dot product: no (rows, V) temporary for q * d.
        qd = torch.bmm(q[:, None, :], d[:, :, None]).view(-1)
        stats[ENTROPY, r] = stats[LOG_SUM, r] - qd


def _torch_grad_rows(
    logits: Tensor,
    target: Tensor,
    stats: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    out: Tensor,
    opts: LossOptions,
    col_offset: int,
    vocab: int,
) -> None:
    """The gradient rows of the module doc from torch ops (the torch backend's side), built in
    the output's storage where it has the accumulation dtype: about 7 passes per row block."""
    M, V = logits.shape
    acc = stats.dtype
    inv_t = opts.logit_scale
    y = target.long()
    valid = y != opts.ignore_index
    bad = valid & ((y < 0) | (y >= vocab))
    local = y - col_offset
    own = valid & (local >= 0) & (local < V)
    local = torch.where(own, local, 0)
    zeros = torch.zeros(M, dtype=acc, device=logits.device)
    g_lp = grad_logp.to(acc) if grad_logp is not None else zeros
    # The row factors with 1 / T folded in: q * (c0 - g_H log q) + g_lp [c == y], all over T.
    c0 = -g_lp
    if grad_entropy is not None:
        g_h = grad_entropy.to(acc)
        c0 = c0 - g_h * stats[ENTROPY]
        neg_g_h = g_h.neg().mul_(inv_t)
    c0 = c0 * inv_t
    hot = torch.where(own, g_lp, 0.0) * inv_t
    cpu = logits.device.type == "cpu"
    compiled = cpu_compiled_log_probs.applies(logits)
    if compiled:
        factors = (c0, neg_g_h if grad_entropy is not None else zeros, local, hot, valid, bad)
    blocks = _row_blocks(logits, acc, compiled)
    for r0 in blocks:
        r = slice(r0, min(M, r0 + blocks.step))
        if compiled and cpu_compiled_log_probs.applies(logits[r]):
            rows = tuple(f[r] for f in factors)
            m, ls = stats[MAX, r], stats[LOG_SUM, r]
            target_rows = logits[r] if out.is_set_to(logits) else out[r]
            if cpu_compiled_log_probs.gradient(logits[r], target_rows, m, ls, rows, inv_t):
                continue
        z = logits[r].to(acc)
        in_place = out.dtype == acc
        lq = out[r] if in_place else torch.empty(z.shape, dtype=acc, device=z.device)
        # log q = (z - m) - log_sum, from the row max; may overwrite z (out may be the logits).
        if inv_t != 1.0:
            torch.mul(z, inv_t, out=lq).sub_(stats[MAX, r, None])
        else:
            torch.sub(z, stats[MAX, r, None], out=lq)
        lq.sub_(stats[LOG_SUM, r, None])
        q = lq.exp()
        if grad_entropy is not None:
            lq.clamp_(min=_LOG_Q_FLOOR)
            torch.addcmul(c0[r, None], neg_g_h[r, None], lq, out=lq).mul_(q)
        else:
            torch.mul(q, c0[r, None], out=lq)
        lq.scatter_add_(1, local[r, None], hot[r, None])
        # Ignored rows exactly 0 (also with NaN logits), unchecked bad ones NaN; on the CPU
        # only where some row needs it (reading the masks costs no sync there).
        if not cpu or not bool(valid[r].all()):
            lq.masked_fill_(~valid[r, None], 0.0)
        if not cpu or bool(bad[r].any()):
            lq.masked_fill_(bad[r, None], float("nan"))
        if not in_place:
            out[r].copy_(lq)


def grad_rows(
    logits: Tensor,
    target: Tensor,
    opts: LossOptions,
    stats: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    out: Tensor | None = None,
    col_offset: int = 0,
    vocab: int | None = None,
    own_stats: bool = True,
) -> Tensor:
    """d (sum g_lp * logp + g_H * H) / d logits for (M, V) rows, written once.

    Args:
        logits: (M, V) logits of the forward pass, unit stride along V.
        target: (M,) class indices (global ones with ``col_offset``).
        opts: ``row_options`` (ignore_index and 1 / T are read).
        stats: the forward's statistics: max, log-sum (and with ``grad_entropy`` the entropy)
            of the WHOLE row (for a slice: the combined statistics of every slice).
        grad_logp, grad_entropy: (M,) upstream gradients, or None where none arrives.
        out: (M, V) buffer for the gradient (may be ``logits``); None allocates one.
        col_offset: the global class of column 0 (a vocabulary slice), else 0.
        vocab: the number of classes of the whole row (V without a slice).
        own_stats: ``stats`` are the row contract's own forward rows of these logits (False
            for a slice's combined statistics).

    Returns:
        (M, V) in the logits' dtype.
    """
    M, V = logits.shape
    vocab = V if vocab is None else vocab
    if out is None:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if grad_logp is None and grad_entropy is None:
        return out.zero_()
    if M == 0 or V == 0:  # nothing to write (V = 0: an empty vocabulary slice)
        return out
    # The cross-entropy's row gradient where it is the answer (see the module doc); it reads
    # the row contract's own forward rows (the lse coefficient too), so not a slice's. On large
    # CPU blocks the compiled gradient rows below are the cheaper of the two (one fused loop,
    # where the row contract's gradient-only rows run eager torch ops).
    if grad_entropy is None and own_stats and not cpu_compiled_log_probs.applies(logits):
        return core.gradient_from_stats(logits, target, None, opts, stats, grad_logp.neg(), out=out)
    acc = accumulation_dtype(logits.dtype)
    flat = [
        g.reshape(-1).to(acc).contiguous() if g is not None else None
        for g in (grad_logp, grad_entropy)
    ]
    if triton_log_probs is not None and backends.uses_triton(logits):
        triton_log_probs.log_prob_grad_rows(
            logits,
            target.contiguous(),
            stats[MAX].contiguous(),
            stats[LOG_SUM].contiguous(),
            stats[ENTROPY].contiguous() if grad_entropy is not None else None,
            flat[0],
            flat[1],
            out,
            opts.ignore_index,
            opts.logit_scale,
            col_offset,
            vocab,
        )
        return out
    _torch_grad_rows(logits, target, stats, flat[0], flat[1], out, opts, col_offset, vocab)
    return out
