"""The autograd Functions of the sharded losses.

``VocabParallelCrossEntropy``: forward runs the local pass over this rank's logits and the
two all-reduces of ``slices.combine``; backward writes this slice of the global gradient and
communicates nothing. ``VocabParallelLinearCrossEntropy``: the same over the logits of the
local weight rows, chunk by chunk (never (N, V_r) at once); backward computes the chunks again,
the local weight / bias gradients, and ONE all-reduce of the (replicated) input's gradient.
Both return (loss, (4, M) statistics or an empty tensor, the reduced z-loss part).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.torch_ops import transformed_logits
from ..linear_chunks import planned_chunk_rows
from ..options import accumulation_dtype
from .slices import (
    Combined,
    SliceTargets,
    combine,
    join_chunks,
    local_grad,
    local_stats,
    normaliser,
    reduce_rows,
    row_factor,
    rows_grad,
    rows_stats,
    slice_log_probs,
)


def _outputs(ctx, c: Combined, inv: Tensor, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, (4, M) statistics or an empty tensor, () reduced z-loss part): the last two are
    non-differentiable outputs."""
    loss = reduce_rows(c.loss, inv, reduction)
    if c.extras is None:
        extras = z_red = loss.new_empty(0)
    else:
        extras = c.extras
        z_red = extras[0].sum() * (inv if reduction == "mean" else 1.0)
    ctx.mark_non_differentiable(extras, z_red)
    return loss, extras, z_red


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: local pass, two all-reduces. Backward: the local slice of the gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, token_weight, sh, opts, want_stats):  # type: ignore[override]
        acc = accumulation_dtype(logits.dtype)
        tt = SliceTargets(target, weight, opts, sh, acc, token_weight, want_stats)
        M, width = logits.shape
        # Row chunks bound the float32 temporaries (the plain head's budget for its logits).
        step = planned_chunk_rows(M, max(width, 1), torch.float32, None, logits.device)
        parts = []
        if tt.on_rows:
            # One launch over all rows (the torch backend works through them in blocks).
            parts = [rows_stats(logits, slice(0, M), tt)] if M else []
        else:
            for r0 in range(0, M, step):
                rows = slice(r0, min(M, r0 + step))
                parts.append(local_stats(logits[rows].to(acc), rows, tt, target))
        c = combine(join_chunks(parts, tt, acc, logits.device), tt, sh, acc)
        inv = normaliser(target, weight, opts.ignore_index, acc, opts.mean, token_weight)
        ctx.save_for_backward(logits, target, c.g_max, c.log_sum, c.a, inv)
        ctx.tt, ctx.reduction, ctx.step = tt, opts.reduction, step
        return _outputs(ctx, c, inv, opts.reduction)

    @staticmethod
    def backward(ctx, grad_output, _grad_extras=None, _grad_z=None):  # type: ignore[override]
        logits, target, g_max, log_sum, a, inv = ctx.saved_tensors
        tt, acc = ctx.tt, log_sum.dtype
        f_all = row_factor(grad_output, inv, ctx.reduction, acc, tt.tw)
        grad_logits = grad_target = None
        M = logits.shape[0]
        if ctx.needs_input_grad[0]:
            grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if ctx.needs_input_grad[1]:
            grad_target = torch.empty_like(target, memory_format=torch.contiguous_format)
        mapped = tt.grad_rows() if tt.on_rows and grad_logits is not None else None
        if mapped is not None:  # class indices: no target gradient
            rows_grad(logits, slice(0, M), tt, mapped, g_max, log_sum, a, f_all, grad_logits)
            return grad_logits, None, None, None, None, None, None
        for r0 in range(0, M, ctx.step):
            rows = slice(r0, min(M, r0 + ctx.step))
            f = f_all[rows] if f_all.dim() else f_all
            x = logits[rows].to(acc)
            if grad_target is not None:
                # d l / d t_c = -(1 - eps) w_c log softmax(z)_c (the z-loss does not depend on t)
                z, _ = transformed_logits(x, tt.opts, need_derivative=False)
                gt = slice_log_probs(z, rows, g_max, log_sum).mul_(-(1.0 - tt.eps))
                if tt.w_loc is not None:
                    gt.mul_(tt.w_loc)
                grad_target[rows] = gt.mul_(f[:, None] if f.dim() else f)
            if grad_logits is not None:
                grad_logits[rows] = local_grad(x, rows, tt, target, g_max, log_sum, a, f)
        return grad_logits, grad_target, None, None, None, None, None


def _linear_logits(x: Tensor, W: Tensor, b: Tensor | None, acc: torch.dtype) -> Tensor:
    return torch.nn.functional.linear(x, W, b).to(acc)


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Forward: the local logits chunk by chunk (never (N, V_r) at once), two all-reduces.
    Backward: the chunks again, the local weight / bias gradients, and ONE all-reduce of the
    input gradient."""

    @staticmethod
    def forward(ctx, x, W, b, target, weight, token_weight, sh, opts, want_stats, step):  # type: ignore[override]
        acc = accumulation_dtype(x.dtype)
        tt = SliceTargets(target, weight, opts, sh, acc, token_weight, want_stats)
        M = x.shape[0]
        parts = []
        for r0 in range(0, M, step):
            rows = slice(r0, min(M, r0 + step))
            logits = _linear_logits(x[rows], W, b, acc)
            if tt.on_rows:
                parts.append(rows_stats(logits, rows, tt))
            else:
                parts.append(local_stats(logits, rows, tt, target))
        c = combine(join_chunks(parts, tt, acc, x.device), tt, sh, acc)
        inv = normaliser(target, weight, opts.ignore_index, acc, opts.mean, token_weight)
        ctx.save_for_backward(x, W, b, target, c.g_max, c.log_sum, c.a, inv)
        ctx.tt, ctx.reduction, ctx.step, ctx.sh = tt, opts.reduction, step, sh
        return _outputs(ctx, c, inv, opts.reduction)

    @staticmethod
    def backward(ctx, grad_output, _grad_extras=None, _grad_z=None):  # type: ignore[override]
        x, W, b, target, g_max, log_sum, a, inv = ctx.saved_tensors
        tt, acc, sh = ctx.tt, log_sum.dtype, ctx.sh
        f_all = row_factor(grad_output, inv, ctx.reduction, acc, tt.tw)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        M = x.shape[0]
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        gw = torch.zeros(W.shape, dtype=acc, device=W.device) if need_w else None
        gb = (
            torch.zeros(W.shape[0], dtype=acc, device=W.device)
            if need_b and b is not None
            else None
        )
        mapped = tt.grad_rows() if tt.on_rows else None
        for r0 in range(0, M, ctx.step):
            rows = slice(r0, min(M, r0 + ctx.step))
            f = f_all[rows] if f_all.dim() else f_all
            logits = _linear_logits(x[rows], W, b, acc)
            if mapped is not None:
                g = torch.empty_like(logits, memory_format=torch.contiguous_format)
                rows_grad(logits, rows, tt, mapped, g_max, log_sum, a, f, g)
            else:
                g = local_grad(logits, rows, tt, target, g_max, log_sum, a, f)
            g_lp = g.to(x.dtype)  # the GEMMs run in the input's dtype, as F.linear's backward
            if gx is not None:
                gx[rows] = g_lp @ W
            if gw is not None:
                gw.add_((g_lp.t() @ x[rows]).to(acc))  # chunk GEMM, float32 accumulation
            if gb is not None:
                gb.add_(g.sum(0))
        if gx is not None:
            # x is replicated: its gradient is the sum of every slice's contribution.
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=sh.group)
            gx = gx.to(x.dtype)
        gw = gw.to(W.dtype) if gw is not None else None
        gb = gb.to(b.dtype) if gb is not None else None
        return gx, gw, gb, None, None, None, None, None, None, None
