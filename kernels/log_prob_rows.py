"""Per-token log-probabilities and entropy on the row contract: the rows behind
``token_log_probs`` and ``linear_token_log_probs``.

For logits viewed as (M, V) rows, z = x / T and q = softmax(z):

* logp_i = log q_{i, y_i} is minus the row loss of the cross-entropy with ``logit_scale = 1 / T``
  and no reduction: the forward is one pass of the row contract (``core.forward``), which also
  writes each row's max m, log-sum and, with its extras, the entropy H (shift-exact, see
  ``core``). Nothing new runs forward.
* The gradient of a row is (g_lp * (onehot(y) - q) + g_H * q * (-log q - H)) / T for upstream
  gradients g_lp, g_H. With g_H absent (no entropy, or an entropy that no gradient reaches) it is
  -g_lp times the cross-entropy's row gradient: the row contract's gradient-only launch
  (``core.gradient_from_stats``) writes it, per-row factor folded in. With g_H it is not one
  row factor times one tensor; one extra pass recomputes q from the saved (m, log_sum, H) and
  writes it (``backends.triton_log_probs`` on CUDA and under the interpreter, torch ops here
  otherwise). Either way backward reads the logits once and writes the gradient once: storing
  the gradient in forward instead would need N x V memory for each of the two terms.
* The fused head recomputes each chunk's logits in backward (``head_backward``): the upstream
  gradients are known only then, and the alternative, keeping N x V gradients, is what the head
  exists to avoid. The input gradient alone could be formed in forward (g_lp * (A @ W) is linear
  in the row factor) but the weight gradient cannot, so the recompute is needed anyway.

Rows whose target is ``ignore_index`` give 0 for both outputs and an exact 0 gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, core
from .index_check import DeferredIndexCheck
from .linear_chunks import WeightGrad, chunked_pass
from .options import LossOptions, accumulation_dtype
from .stat_rows import ENTROPY, LOG_SUM, LOSS, MAX

# Only where ``backends`` found Triton (the same condition, so that both agree).
if backends.triton_kernels is not None:
    from .backends import triton_log_probs
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


def outputs_from_stats(
    stats: Tensor, target: Tensor, ignore_index: int, entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """(logp, entropy or None) from the row statistics: -loss and the entropy row, 0 where the
    row is ignored (also where its logits are NaN)."""
    valid = target != ignore_index
    logp = torch.where(valid, -stats[LOSS], 0.0)
    ent = torch.where(valid, stats[ENTROPY], 0.0) if entropy else None
    return logp, ent


def forward_rows(
    logits: Tensor, target: Tensor, opts: LossOptions, entropy: bool, defer_check: bool = False
) -> RowsForward:
    """logp (and H) of (M, V) logits with unit stride along V; ``target`` (M,) class indices
    (int32 / int64). One pass of the row contract; raises IndexError for a class index out of
    range (deferred to backward on CUDA with ``defer_check``)."""
    fwd = core.forward(logits, target, None, opts, False, defer_check=defer_check, extras=entropy)
    logp, ent = outputs_from_stats(fwd.stats, target, opts.ignore_index, entropy)
    return RowsForward(logp, ent, fwd.stats, fwd.pending_check)


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
    """The gradient rows of the module doc from torch ops (the torch backend's side)."""
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
    step = max(1, CPU_ROW_BLOCK_BYTES // max(V * torch.finfo(acc).bits // 8, 1))
    for r0 in range(0, M, step if logits.device.type == "cpu" else M):
        r = slice(r0, min(M, r0 + step))
        z = logits[r].to(acc)
        z = z * inv_t if inv_t != 1.0 else z
        log_q = (z - stats[MAX, r, None]).sub_(stats[LOG_SUM, r, None])
        q = log_q.exp()
        if grad_entropy is not None:
            g_h = grad_entropy[r].to(acc)[:, None]
            c0 = (-g_lp[r] - grad_entropy[r].to(acc) * stats[ENTROPY, r])[:, None]
            # q log q -> 0 as q -> 0: never 0 * inf at a logit of -inf.
            g = torch.where(q > 0, q * (c0 - g_h * log_q), 0.0)
        else:
            g = q.mul_(-g_lp[r, None])
        g.scatter_add_(1, local[r, None], torch.where(own[r], g_lp[r], 0.0)[:, None])
        if inv_t != 1.0:
            g.mul_(inv_t)
        g = torch.where(valid[r, None], g, 0.0)
        g.masked_fill_(bad[r, None], float("nan"))
        out[r].copy_(g)


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
    # the row contract's own forward rows (the lse coefficient too), so not a slice's.
    if grad_entropy is None and own_stats:
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


# --------------------------------------------------------------------------------------------
# The fused head: chunks of x @ W.T (+ b), never all N x V
# --------------------------------------------------------------------------------------------


def head_forward(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    opts: LossOptions,
    chunk_rows: int,
    entropy: bool,
) -> Tensor:
    """(4, N) or (7, N) row statistics of the head's logits, chunk by chunk: the fused linear
    cross-entropy's loop (``linear_chunks.chunked_pass``) without gradients.

    Args:
        x: (N, D) contiguous. W: (V, D). b: (V,) or None. target: (N,) class indices.
        opts: ``row_options``. chunk_rows: token rows per chunk. entropy: fill the extras.
    """
    stats, *_ = chunked_pass(
        x, W, b, target, None, opts, chunk_rows, "float32", None, (False,) * 3, None, entropy
    )
    return stats


def head_backward(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    opts: LossOptions,
    stats: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    chunk_rows: int,
    needs: tuple[bool, bool, bool],
    col_offset: int = 0,
    vocab: int | None = None,
    own_stats: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_x (N, D), grad_W (V, D), grad_b (V,)), each None where ``needs`` says no: each
    chunk's logits recomputed, its gradient written over them in place (``grad_rows``), then
    the three products. grad_W and grad_b accumulate in float32 for half-precision weights.

    Args: as ``head_forward``; ``stats`` from it (or the combined statistics of a vocabulary
    slice, with ``col_offset``, ``vocab`` and ``own_stats`` as in ``grad_rows``); ``grad_logp`` /
    ``grad_entropy`` (N,) or None.
    """
    if torch.is_autocast_enabled(x.device.type):
        # The operands already have the autocast dtype; keep the float32 sums float32.
        with torch.autocast(x.device.type, enabled=False):
            return head_backward(
                x, W, b, target, opts, stats, grad_logp, grad_entropy, chunk_rows, needs,
                col_offset, vocab, own_stats,
            )  # fmt: skip
    N = x.shape[0]
    V = W.shape[0]
    acc = accumulation_dtype(x.dtype)
    gx = torch.empty_like(x) if needs[0] else None
    gw = WeightGrad(W, "float32") if needs[1] else None
    gb = torch.zeros(V, dtype=acc, device=x.device) if needs[2] and b is not None else None
    buf = torch.empty((min(chunk_rows, N), V), dtype=x.dtype, device=x.device)
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        x_c = x[start:end]
        logits = buf[: end - start]
        # The same product as forward's, so the saved statistics describe these logits.
        if b is None:
            torch.mm(x_c, W.t(), out=logits)
        else:
            torch.addmm(b, x_c, W.t(), out=logits)
        grad_rows(
            logits,
            target[start:end],
            opts,
            stats[:, start:end],
            grad_logp[start:end] if grad_logp is not None else None,
            grad_entropy[start:end] if grad_entropy is not None else None,
            out=logits,
            col_offset=col_offset,
            vocab=vocab,
            own_stats=own_stats,
        )
        if gx is not None:
            torch.mm(logits, W, out=gx[start:end])
        if gw is not None:
            gw.add(logits, x_c)
        if gb is not None:
            gb += logits.sum(0, dtype=acc)
    if gx is not None and N == 0:
        gx.zero_()
    return (
        gx,
        gw.result() if gw is not None else None,
        gb.to(b.dtype) if gb is not None else None,
    )
