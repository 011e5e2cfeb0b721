"""``token_log_probs`` / ``linear_token_log_probs`` with the class dimension split over a process
group: contiguous slices in rank order, global class ids in ``target``, the same result on every
rank.

Forward, per rank r and row i, the slice's own statistics come from the row contract with the
slice's local target (the rows whose class lives elsewhere are ignored there): the slice max
m_r, log_sum_r = log sum_{c in r} exp(z_c - m_r), the slice entropy H_r of softmax over the slice
alone, whether it holds y_i and there log q^r_y. One ``all_gather`` of these 5 numbers per row
(O(N) per rank, never the logits) gives every rank the same table, which each combines in rank
order, so that every rank computes the same bits:

    M = max_r m_r,  rel_r = (m_r - M) + log_sum_r,  log_sum = logsumexp_r rel_r,
    log pi_r = rel_r - log_sum                     (the share of the mass on slice r),
    logp = log pi_o + log q^o_y                    (o: the slice holding y),
    H = sum_r pi_r (H_r - log pi_r)                (the entropy of a mixture of disjoint parts).

Everything is relative to a max (shift-exact). Backward needs no exchange for the logits: each
rank writes its slice's gradient from the combined (M, log_sum, H) and the global ids
(``log_probs.rows.grad_rows`` with a column offset). The linear head's input gradient is the sum
of the slices' ``g_r @ W_r``: one ``all_reduce`` inside backward.

A DTensor logits sharded on the class dimension of a 1-D mesh (or a head weight sharded by rows)
is the same call on the local tensors over the mesh's group (``dtensor``, as the cross-entropy's
``route`` does), its outputs replicated DTensors.

The arguments are checked on each rank and agreed in the package's metadata exchange
(``agreement.agree``: one small all_gather), so that a bad argument on one rank raises the same
error on every rank instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .. import core
from ..linear_chunks import planned_chunk_rows
from ..log_probs.checks import (
    HeadCall,
    LogitsCall,
    check_head,
    check_log_prob_options,
    check_logits,
)
from ..log_probs.head import head_backward, head_forward, head_rows
from ..log_probs.rows import flat_rows, grad_rows, row_options, shaped
from ..options import accumulation_dtype
from ..stat_rows import ENTROPY, EXTRA_STAT_ROWS, LOG_SUM, LOSS, MAX
from . import dtensor
from .agreement import Shard, ShardMeta, agree, resolve_group
from .route import shard_meta, wants_vocab_parallel

# The ignore_index of a slice's local targets: no local class index is negative.
_NOT_HERE = -1
# The errors a rank's own checks raise; sent to the agreement so that every rank raises.
_CHECK_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)


def _meta(
    width: int, rows: int, shape: tuple[int, ...], features: int, dtype, ii: int, T: float, ent
) -> ShardMeta:
    """This rank's row of the metadata exchange: the cross-entropy's with no reduction, the
    logit scale 1 / T, and the entropy asked for as its statistics."""
    opts = row_options(ii, T)
    return shard_meta(opts, ent, None, None, (rows, width, features), shape, False, dtype)


def _local_target(t: Tensor, sh: Shard, ignore_index: int) -> Tensor:
    """The slice's class indices: y - start where this slice holds y, else ``_NOT_HERE``."""
    local = t.long() - sh.start
    own = (t != ignore_index) & (local >= 0) & (local < sh.width)
    return torch.where(own, local, _NOT_HERE)


def _slice_table(stats: Tensor | None, local_t: Tensor, entropy: bool, acc: torch.dtype) -> Tensor:
    """(5, M): this slice's m_r, log_sum_r, log q^r_y (0 where not here), H_r (0 without the
    entropy), 1 where it holds y; an empty slice holds no mass (log_sum_r = -inf)."""
    table = torch.zeros((5, local_t.shape[0]), dtype=acc, device=local_t.device)
    table[4] = local_t != _NOT_HERE
    if stats is None:
        table[1] = float("-inf")
        return table
    table[0], table[1], table[2] = stats[MAX], stats[LOG_SUM], -stats[LOSS]
    if entropy:
        table[3] = stats[ENTROPY]
    return table


def _combine(
    table: Tensor, t: Tensor, ignore_index: int, entropy: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(logp, entropy or None, combined stats (7, M) with MAX, LOG_SUM, ENTROPY) from the
    gathered (world, 5, M) table, in rank order; see the module doc."""
    m, ls, logq, h, holds = table.unbind(1)
    has_mass = ls > float("-inf")
    big = torch.where(has_mass, m, float("-inf")).amax(0)
    big = torch.where(big == float("-inf"), 0.0, big)  # no finite logit in the row
    rel = (m - big) + ls
    log_sum = torch.logsumexp(rel, dim=0)
    log_pi = rel - log_sum
    valid = t != ignore_index
    # One slice holds y: the sum adds zeros to its value (exact; never 0 * -inf).
    logp = torch.where(holds != 0, log_pi + logq, 0.0).sum(0)
    logp = torch.where(valid, logp, 0.0)
    stats = torch.zeros((EXTRA_STAT_ROWS, t.shape[0]), dtype=table.dtype, device=t.device)
    stats[MAX], stats[LOG_SUM] = big, log_sum
    ent = None
    if entropy:
        pi = log_pi.exp()
        # 0 log 0 = 0: a slice without mass adds nothing.
        full = torch.where(pi > 0, pi * (h - log_pi), 0.0).sum(0)
        stats[ENTROPY] = full
        ent = torch.where(valid, full, 0.0)
    return logp, ent, stats


def _gather(table: Tensor, group: object) -> Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(table) for _ in range(world)]
    dist.all_gather(parts, table.contiguous(), group=group)
    return torch.stack(parts)


class _ShardedTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, T, ii, entropy, sh):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        local_t = _local_target(t, sh, ii)
        stats = None
        if sh.width > 0:
            local_opts = row_options(_NOT_HERE, T)
            stats = core.forward(x, local_t, None, local_opts, False, extras=entropy).stats
        table = _slice_table(stats, local_t, entropy, accumulation_dtype(x.dtype))
        logp, ent, combined = _combine(_gather(table, sh.group), t, ii, entropy)
        ctx.save_for_backward(x, t, combined)
        ctx.opts, ctx.sh = row_options(ii, T), sh
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        x, t, combined = ctx.saved_tensors
        sh = ctx.sh
        grad = grad_rows(
            x, t, ctx.opts, combined, grad_logp, grad_entropy, None, sh.start, sh.vocab, False
        )
        return grad, None, None, None, None, None


class _ShardedLinearTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, t, T, ii, entropy, rows, sh):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        local_t = _local_target(t, sh, ii)
        stats = None
        if sh.width > 0:
            opts = row_options(_NOT_HERE, T)
            _, _, stats = head_forward(x, W, b, local_t, opts, rows, entropy)
        table = _slice_table(stats, local_t, entropy, accumulation_dtype(x.dtype))
        logp, ent, combined = _combine(_gather(table, sh.group), t, ii, entropy)
        ctx.save_for_backward(x, W, b, t, combined)
        ctx.opts, ctx.sh, ctx.rows = row_options(ii, T), sh, rows
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        x, W, b, t, combined = ctx.saved_tensors
        sh = ctx.sh
        needs = tuple(ctx.needs_input_grad[:3])
        if sh.width > 0:
            gx, gw, gb = head_backward(
                x, W, b, t, ctx.opts, combined, grad_logp, grad_entropy, ctx.rows, needs,
                sh.start, sh.vocab, False,
            )  # fmt: skip
        else:  # an empty slice adds nothing to the input gradient
            gx = torch.zeros_like(x) if needs[0] else None
            gw = torch.zeros_like(W) if needs[1] else None
            gb = torch.zeros_like(b) if needs[2] and b is not None else None
        if gx is not None:
            # The input gradient is the sum of every slice's: each rank gets the whole of it.
            dist.all_reduce(gx, group=sh.group)
        return gx, gw, gb, None, None, None, None, None, None


def _sharded_arg(call: LogitsCall | HeadCall) -> object:
    """The argument split over the ranks: the logits, or the head's weight."""
    return call.linear_weight if isinstance(call, HeadCall) else call.logits


def wants_sharded(call: LogitsCall | HeadCall, process_group: object) -> bool:
    """Whether a call goes here: a process group was given (``group.WORLD`` before
    ``init_process_group`` is None: no group), or the logits (the head's weight) is a DTensor."""
    return wants_vocab_parallel(_sharded_arg(call), process_group)


def _dtensor_parts(
    who: str, call: LogitsCall | HeadCall, process_group: object
) -> tuple[object, LogitsCall | HeadCall]:
    """(the 1-D mesh, the call on this rank's local tensors) of a call whose logits are a
    DTensor sharded on the class (last) dimension, or whose head weight is one sharded by rows
    (the other tensors: plain, or replicated DTensors; a bias sharded like the weight)."""
    if isinstance(call, HeadCall):
        mesh, x, W, t, b, _, _ = dtensor.linear_parts(
            who, call.input, call.linear_weight, call.target, call.linear_bias, None, None,
            process_group,
        )  # fmt: skip
        return mesh, call._replace(input=x, linear_weight=W, target=t, linear_bias=b)
    mesh, logits = dtensor.logits_parts(who, call.logits, process_group)
    target = dtensor.local_part(who, call.target, "target")
    return mesh, call._replace(logits=logits, target=target)


def call_sharded(
    who: str, call: LogitsCall | HeadCall, process_group: object, plain: Callable[..., object]
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_log_probs`` (a ``LogitsCall``: this rank's (..., V_r) logits) or
    ``linear_token_log_probs`` (a ``HeadCall``: this rank's (V_r, D) rows of the head) over
    ``process_group``, or over the mesh of a DTensor logits / head weight (the outputs then
    replicated DTensors). A group of one rank runs ``plain(who, call)``: the unsharded
    implementation, passed in by the public module, which this package never imports."""
    if dtensor.is_dtensor(_sharded_arg(call)):
        # The local slices on the mesh's group; the outputs come back replicated.
        mesh, local = _dtensor_parts(who, call, process_group)
        out = call_sharded(who, local, mesh.get_group(), plain)
        if isinstance(out, tuple):
            return tuple(dtensor.replicated(t, mesh) for t in out)
        return dtensor.replicated(out, mesh)
    group = resolve_group(who, process_group)
    if group is None or dist.get_world_size(group) == 1:
        return plain(who, call)
    head = isinstance(call, HeadCall)
    error, meta, t, ii = None, None, None, -100
    try:
        T, ii, entropy = check_log_prob_options(who, call)
        if head:
            check_head(who, call, slice_ok=True)
            width, features = call.linear_weight.shape
            x, t = head_rows(call, ii)
            rows = planned_chunk_rows(x.shape[0], max(width, 1), x.dtype, call.chunk_size, x.device)
        else:
            check_logits(who, call, slice_ok=True)
            x, t = flat_rows(call.logits, call.target, ii)
            width, features = x.shape[1], 0
        shape = tuple(call.target.shape)
        meta = _meta(width, x.shape[0], shape, features, x.dtype, ii, T, entropy)
    except _CHECK_ERRORS as e:
        error = e
    # The exchange runs on the device of the first tensor argument (the logits, the input).
    device = call[0].device if isinstance(call[0], Tensor) else torch.device("cpu")
    sh = agree(who, group, device, error, meta, t if meta is not None else None, ii)
    if head:
        W, b = call.linear_weight, call.linear_bias
        out = _ShardedLinearTokenLogProbs.apply(x, W, b, t, T, ii, entropy, rows, sh)
    else:
        out = _ShardedTokenLogProbs.apply(x, t, T, ii, entropy, sh)
    return shaped(*(out if entropy else (out, None)), entropy, shape)
