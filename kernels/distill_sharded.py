"""The vocabulary-parallel form of the distillation losses: each rank holds a contiguous slice
of the classes (in rank order), ids and class indices are global, and every rank gets the loss
of the whole vocabulary; never the logits, only O(N) or O(N k) numbers are exchanged.

Per row, on the slice [v0, v0 + V_r) of z = x / T (and of a dense teacher's t / T):

1. one all_reduce(MAX) of the slices' maxima (student, the raw logits for the cross-entropy at
   T != 1, the teacher), then one all_reduce(SUM) of their sums of exp(. - m): (m, log_sum) of
   the whole row, shift-exact as in the unsharded rows;
2. a sparse teacher: the gathered z_S (0 where another rank owns the id) and the true class's
   logit, one all_reduce(SUM) of N (k + 1) numbers: every rank then holds log q_S and computes
   D, G and the tail's g itself (identical arithmetic on identical numbers);
3. a dense teacher: the slices' sums of d and r (reverse KL and JSD read G), one
   all_reduce(SUM) of 2 N numbers.

The gradient of the slice is then local (formulas of ``backends.torch_distill``), computed with
torch ops in forward with its factor folded in; backward scales it by the upstream gradient (for
"none", each row's: the half-precision gradient is rounded twice there). The fused head all-
reduces the input's gradient (N, D) inside.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import distill_core
from .backends.torch_distill import _masked_log_softmax, terms
from .distill_options import DistillOptions
from .options import accumulation_dtype


def agree(
    who: str, width: int, refused: Exception | None, group: object, device: torch.device
) -> tuple[int, int]:
    """The ranks' agreement, one all_gather of (slice width, refused) per rank: (v0, V), this
    rank's first global class and the whole vocabulary.

    A rank whose arguments were refused raises its own error after the exchange, and every
    other rank a ValueError naming it, so that no rank waits for a collective that another
    will never join.
    """
    world = dist.get_world_size(group)
    mine = torch.tensor([width, int(refused is not None)], dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    if refused is not None:
        raise refused
    bad = [r for r, t in enumerate(rows) if int(t[1])]
    if bad:
        raise ValueError(
            f"{who}: the arguments of rank(s) {bad} of the process group were refused (their "
            "error says why); every rank raises"
        )
    sizes = [int(t[0]) for t in rows]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _max_sum(values: list[Tensor], group: object) -> list[tuple[Tensor, Tensor]]:
    """(m, log_sum) of whole rows from each (N, V_r) slice in ``values``: two all_reduces."""
    maxes = torch.stack(
        [v.amax(1) if v.shape[1] else v.new_full(v.shape[:1], float("-inf")) for v in values]
    )
    dist.all_reduce(maxes, dist.ReduceOp.MAX, group=group)
    maxes = torch.where(maxes == float("-inf"), 0.0, maxes)
    sums = torch.stack([(v - m[:, None]).exp().sum(1) for v, m in zip(values, maxes, strict=True)])
    dist.all_reduce(sums, group=group)
    return [(maxes[i], sums[i].log()) for i in range(len(values))]


def sharded_rows(
    x: Tensor,
    teacher: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    v0: int,
    V: int,
    group: object,
    factor: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """(row losses (N,), gradient of the slice (N, V_r) times ``factor`` (() or (N,)), or None
    without a factor) for the slice x of global classes [v0, v0 + V_r)."""
    N, Vr = x.shape
    acc = accumulation_dtype(x.dtype)
    T, a = opts.temperature, opts.hard_weight
    xf = x.to(acc)
    z = xf / T if T != 1.0 else xf
    hard = target is not None and a > 0.0
    soft = a < 1.0
    values = [z]
    if hard and T != 1.0:
        values.append(xf)
    if soft and teacher is not None:
        values.append(teacher.to(acc) / T)
    stats = _max_sum(values, group)
    m, log_sum = stats[0]
    logq = (z - m[:, None]) - log_sum[:, None]
    rows = torch.ones(N, dtype=torch.bool, device=x.device)
    y_local = y_ok = None
    if target is not None:
        rows = target != opts.ignore_index
        y_ok = rows & (target >= v0) & (target < v0 + Vr)
        y_local = torch.where(y_ok, target - v0, 0)
    # The gathered logits other ranks need: z at the local ids of S, x at the true class.
    gathered = []
    if soft and ids is not None:
        own = (ids >= v0) & (ids < v0 + Vr)
        own_idx = torch.where(own, ids - v0, 0)
        # A slice of no class (a rank may hold none) owns nothing and gathers nothing.
        local_z = z.gather(1, own_idx) if Vr else torch.zeros_like(own_idx, dtype=acc)
        gathered.append(torch.where(own, local_z, 0.0))
    if hard:
        x_y = (
            xf.gather(1, y_local[:, None])[:, 0]
            if Vr
            else torch.zeros(N, dtype=acc, device=x.device)
        )
        gathered.append(torch.where(y_ok, x_y, 0.0)[:, None])
    if gathered:
        g_all = torch.cat(gathered, 1)
        dist.all_reduce(g_all, group=group)
    D = torch.zeros(N, dtype=acc, device=x.device)
    gz = None
    want = factor is not None
    if soft and teacher is not None:
        mt, lt = stats[-1]
        logp = (teacher.to(acc) / T - mt[:, None]) - lt[:, None]
        d, r = terms(logp, logq, opts)
        DG = torch.stack([d.sum(1), r.sum(1)])
        dist.all_reduce(DG, group=group)
        D, G = DG[0], DG[1]
        if want:
            gz = r - logq.exp() * G[:, None]
    elif soft:
        k = ids.shape[1]
        valid = ids >= 0
        lq = torch.where(valid, (g_all[:, :k] - m[:, None]) - log_sum[:, None], float("-inf"))
        lp = torch.where(valid, log_probs.to(acc), float("-inf"))
        if not opts.bin:
            lq, lp = _masked_log_softmax(lq, valid), _masked_log_softmax(lp, valid)
        d, r = terms(lp, lq, opts)
        d, r = torch.where(valid, d, 0.0), torch.where(valid, r, 0.0)
        D, G = d.sum(1), r.sum(1)
        if opts.bin:
            open_bin = valid.sum(1) < V
            p_tail = torch.where(open_bin, (1.0 - lp.exp().sum(1)).clamp_min(0.0), 0.0)
            q_tail = torch.where(open_bin, (1.0 - lq.exp().sum(1)).clamp_min(0.0), 0.0)
            dt, rt = terms(p_tail.log(), q_tail.log(), opts)
            D, G = D + dt, G + rt
        if want:
            qS = lq.exp()
            if opts.bin:
                g_tail = torch.where(q_tail > 0, rt / q_tail, 0.0)
                gz = logq.exp() * (g_tail - G)[:, None]
                fix = r - qS * g_tail[:, None]
            else:
                gz = torch.zeros_like(logq)
                fix = r - qS * G[:, None]
            if Vr:
                gz.scatter_add_(1, own_idx, torch.where(own, fix, 0.0))
    ce = None
    if hard:
        m1, l1 = stats[1] if T != 1.0 else (m, log_sum)
        ce = (m1 - g_all[:, -1]) + l1
    if ce is None:
        row_loss = D
    elif a == 1.0:
        row_loss = ce
    else:
        row_loss = (1.0 - a) * D + a * ce
    row_loss = torch.where(rows, row_loss, 0.0)
    if not want:
        return row_loss, None
    g = gz * ((1.0 - a) / T) if gz is not None else torch.zeros_like(logq)
    if hard:
        logq1 = logq if T == 1.0 else (xf - m1[:, None]) - l1[:, None]
        g.add_(logq1.exp(), alpha=a)
        if Vr:
            g.scatter_add_(1, y_local[:, None], (y_ok.to(acc) * -a)[:, None])
    f = factor.to(acc)
    g.mul_(f[:, None] if f.dim() == 1 else f)
    g.masked_fill_(~rows[:, None], 0.0)
    return row_loss, g.to(x.dtype)


class ShardedDistillation(torch.autograd.Function):
    """The loss of the whole vocabulary from this rank's slice; the slice's gradient is computed
    in forward (unit factors per row for "none") and scaled in backward."""

    @staticmethod
    def forward(ctx, x, teacher, ids, log_probs, target, opts, v0, V, group):  # type: ignore[override]
        scale = distill_core.mean_scale(x.shape[0], target, opts, x)
        factor = scale if not opts.per_row else torch.ones((), dtype=scale.dtype, device=x.device)
        rows, grad = sharded_rows(x, teacher, ids, log_probs, target, opts, v0, V, group, factor)
        ctx.grad, ctx.per_row = grad, opts.per_row
        return distill_core.reduce(rows, scale, opts)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        g = grad_output.to(ctx.grad.dtype)
        grad = ctx.grad * (g[:, None] if ctx.per_row else g)
        ctx.grad = None
        return grad, None, None, None, None, None, None, None, None


def distillation_loss_sharded(
    who: str,
    x: Tensor,
    teacher: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    group: object,
    v0: int,
    V: int,
) -> Tensor:
    """``distillation_loss`` of the slice ``x`` (N, V_r) of global classes [v0, v0 + V_r) (rows
    flattened, checked, agreed: ``agree``) over ``group``: the (reduced) loss of the whole
    vocabulary, identical on every rank."""
    distill_core.check_values(who, V, ids, log_probs, target, opts.ignore_index, False)
    if torch.is_grad_enabled() and x.requires_grad:
        return ShardedDistillation.apply(x, teacher, ids, log_probs, target, opts, v0, V, group)
    scale = distill_core.mean_scale(x.shape[0], target, opts, x)
    rows, _ = sharded_rows(x, teacher, ids, log_probs, target, opts, v0, V, group, None)
    return distill_core.reduce(rows, scale, opts)


def linear_pass(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    dense: tuple[Tensor, Tensor, Tensor | None] | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    target: Tensor | None,
    opts: DistillOptions,
    chunk_rows: int,
    v0: int,
    V: int,
    group: object,
    factor: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The fused head on this rank's slice W (V_r, D): (row losses, grad_x all-reduced over the
    group, grad_W of the slice, grad_b of the slice); the gradients with ``factor`` only."""
    N = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc, device=x.device)
    want = factor is not None
    per_row = want and factor.dim() == 1
    gx = torch.zeros(N, x.shape[1], dtype=acc, device=x.device) if want and needs[0] else None
    gw = torch.zeros(W.shape, dtype=acc, device=x.device) if want and needs[1] else None
    gb = torch.zeros(W.shape[0], dtype=acc, device=x.device) if want and needs[2] else None
    for start in range(0, max(N, 1), chunk_rows):
        end = min(start + chunk_rows, N)
        x_c = x[start:end]
        logits = torch.addmm(b, x_c, W.t()) if b is not None else x_c @ W.t()
        t_c = None
        if dense is not None:
            tx, tW, tb = dense
            t_c = (
                torch.addmm(tb, tx[start:end], tW.t()) if tb is not None else tx[start:end] @ tW.t()
            )
        rows, g = sharded_rows(
            logits,
            t_c,
            ids[start:end] if ids is not None else None,
            log_probs[start:end] if log_probs is not None else None,
            target[start:end] if target is not None else None,
            opts,
            v0,
            V,
            group,
            (factor[start:end] if per_row else factor) if want else None,
        )
        loss[start:end] = rows
        if g is None:
            continue
        if gx is not None:
            gx[start:end] = (g @ W).to(acc)
        if gw is not None:
            gw += (g.t() @ x_c).to(acc)
        if gb is not None:
            gb += g.sum(0, dtype=acc)
    if gx is not None:
        dist.all_reduce(gx, group=group)  # every slice's part of the input's gradient
    return loss, _cast(gx, x), _cast(gw, W), _cast(gb, b) if b is not None else None


def _cast(t: Tensor | None, like: Tensor) -> Tensor | None:
    return t.to(like.dtype) if t is not None else None


class ShardedLinearDistillation(torch.autograd.Function):
    """The fused head over vocabulary slices: scalar reductions compute the gradients in
    forward; "none" runs the slices' loop again in backward with each row's factor."""

    @staticmethod
    def forward(ctx, x, W, b, tx, tW, tb, ids, log_probs, target, opts, rows, v0, V, group):  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        dense = (tx, tW, tb) if tx is not None else None
        scale = distill_core.mean_scale(x.shape[0], target, opts, x)
        args = (ids, log_probs, target, opts, rows, v0, V, group)
        if opts.per_row:
            loss, *_ = linear_pass(x, W, b, dense, *args, None, needs)
            ctx.save_for_backward(x, W, b, tx, tW, tb, ids, log_probs, target)
            ctx.grads = None
        else:
            row_loss, gx, gw, gb = linear_pass(x, W, b, dense, *args, scale, needs)
            loss = distill_core.reduce(row_loss, scale, opts)
            ctx.grads = (gx, gw, gb)
        ctx.rest, ctx.needs = (opts, rows, v0, V, group), needs
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.grads is None:
            x, W, b, tx, tW, tb, ids, log_probs, target = ctx.saved_tensors
            opts, rows, v0, V, group = ctx.rest
            dense = (tx, tW, tb) if tx is not None else None
            factor = grad_output.reshape(-1).to(accumulation_dtype(x.dtype))
            args = (ids, log_probs, target, opts, rows, v0, V, group)
            _, gx, gw, gb = linear_pass(x, W, b, dense, *args, factor, ctx.needs)
        else:
            gx, gw, gb = (g * grad_output.to(g.dtype) if g is not None else None for g in ctx.grads)
            ctx.grads = None
        return (gx, gw, gb) + (None,) * 11
