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

The gradient of the slice is then local (formulas and helpers of ``backends.torch_distill``),
computed in forward with its factor folded in; backward scales it by the upstream gradient (for
"none", each row's: the half-precision gradient is rounded twice there). The fused head
all-reduces the input's gradient (N, D) inside (``linear_pass``: the chunks of
``distillation.core.teacher_chunks``).

Where ``distillation.core.rows_backend`` gives the slice's logits the Triton rows (CUDA tensors,
CPU tensors under TRITON_INTERPRET=1; ``slices_backend``), the O(N V_r) passes are the kernels of
``backends.triton_distill_slices``: one sweep for the slice's local (max, sum of exp) per
statistic (each sum rescaled to the global max before the all_reduce(SUM): step 1 without a
second sweep), one for a dense teacher's sums of d and r, one writing the gradient in the
logits' dtype. The exchanges and the O(N) / O(N k) row arithmetic (the gathers, ``sparse_terms``,
the loss) stay torch ops on both paths; elsewhere (float64, FUSEDCE_BACKEND=torch) the passes are
torch ops on (N, V_r) temporaries.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.torch_distill import (
    mixed_loss,
    scale_grad_,
    soft_grad,
    sparse_grad,
    sparse_terms,
    terms,
)
from ..distillation import core
from ..distillation.options import DistillOptions
from ..distillation.teacher import Teacher, TeacherHead
from ..distillation.value_checks import ValueCheck
from ..options import accumulation_dtype

# The slices' Triton kernels where the Triton rows exist (``core`` imports them under the
# backends' own guard).
if core.triton_distill is not None:
    from ..backends import triton_distill_slices
else:  # pragma: no cover - depends on the platform
    triton_distill_slices = None


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


def _merge_stats(local: Tensor, group: object) -> Tensor:
    """The whole rows' (m, log_sum) (S, 2, N) from the slices' local (max, sum of exp(. - max))
    (2, S, N) of ``triton_distill_slices.slice_stats``: the same two all_reduces, each sum
    rescaled from its slice's max to the global one (O(N))."""
    maxes = local[0].clone()
    dist.all_reduce(maxes, dist.ReduceOp.MAX, group=group)
    maxes = torch.where(maxes == float("-inf"), 0.0, maxes)
    # A slice of no class (max -inf, sum 0) adds exp(-inf) * 0 = 0.
    sums = local[1] * (local[0] - maxes).exp()
    dist.all_reduce(sums, group=group)
    return torch.stack([maxes, sums.log()], 1).contiguous()


def slices_backend(x: Tensor) -> ModuleType | None:
    """The kernels of the slice's O(N V_r) passes: ``triton_distill_slices`` where
    ``distillation.core.rows_backend`` gives these logits the Triton rows, else None (torch
    ops). Looked up at each call."""
    if triton_distill_slices is not None and core.rows_backend(x) is core.triton_distill:
        return triton_distill_slices
    return None


class VocabSlice(NamedTuple):
    """This rank's classes [v0, v0 + V_r) of the whole vocabulary V, split over ``group``."""

    v0: int
    V: int
    group: object


def sharded_rows(
    x: Tensor,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
    sl: VocabSlice,
    factor: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """(row losses (N,), gradient of the slice (N, V_r) times ``factor`` (() or (N,)), or None
    without a factor) for the slice x of global classes [v0, v0 + V_r): the teacher's logits
    are its slice of the same classes, its ids global. The O(N V_r) passes run on the kernels
    of ``slices_backend`` where it gives some, else as torch ops."""
    N, Vr = x.shape
    v0, group = sl.v0, sl.group
    acc = accumulation_dtype(x.dtype)
    T, a = opts.temperature, opts.hard_weight
    hard = target is not None and a > 0.0
    soft = a < 1.0
    t_dense = teacher.logits if soft else None
    kernels = slices_backend(x)
    if kernels is None:
        xf = x.to(acc)
        z = xf / T if T != 1.0 else xf
        values = [z]
        if hard and T != 1.0:
            values.append(xf)
        if t_dense is not None:
            values.append(t_dense.to(acc) / T)
        stats = _max_sum(values, group)
        m, log_sum = stats[0]
        logq = (z - m[:, None]) - log_sum[:, None]
    else:
        glob = _merge_stats(kernels.slice_stats(x, t_dense, T, hard and T != 1.0), group)
        stats = [(glob[i, 0], glob[i, 1]) for i in range(glob.shape[0])]
        m, log_sum = stats[0]
    rows = torch.ones(N, dtype=torch.bool, device=x.device)
    y_local = y_ok = None
    if target is not None:
        rows = target != opts.ignore_index
        y_ok = rows & (target >= v0) & (target < v0 + Vr)
        y_local = torch.where(y_ok, target - v0, 0)
    # The gathered logits other ranks need: z at the local ids of S, x at the true class.
    gathered = []
    if soft and teacher.ids is not None:
        own = (teacher.ids >= v0) & (teacher.ids < v0 + Vr)
        own_idx = torch.where(own, teacher.ids - v0, 0)
        z_s = _own_values(x, own, own_idx).to(acc)
        gathered.append(z_s / T if T != 1.0 else z_s)
    if hard:
        gathered.append(_own_values(x, y_ok[:, None], y_local[:, None]).to(acc))
    if gathered:
        g_all = torch.cat(gathered, 1)
        dist.all_reduce(g_all, group=group)
    D = torch.zeros(N, dtype=acc, device=x.device)
    c = torch.zeros(N, dtype=acc, device=x.device)  # the kernel's row constant (G, g_tail - G)
    gz = at_s = None
    want = factor is not None
    if t_dense is not None:
        if kernels is None:
            mt, lt = stats[-1]
            logp = (t_dense.to(acc) / T - mt[:, None]) - lt[:, None]
            d, r = terms(logp, logq, opts)
            DG = torch.stack([d.sum(1), r.sum(1)])
        else:
            DG = kernels.slice_sums(x, t_dense, glob, opts)
        dist.all_reduce(DG, group=group)
        D, c = DG[0], DG[1]
        if want and kernels is None:
            gz = r - logq.exp() * c[:, None]
    elif soft:
        k = teacher.ids.shape[1]
        lq = (g_all[:, :k] - m[:, None]) - log_sum[:, None]
        D, outside, at_s = sparse_terms(lq, teacher.log_probs, teacher.ids >= 0, opts, sl.V)
        if outside is not None:
            c = outside
        if want and kernels is None:
            gz = sparse_grad(logq, outside)
            if Vr:
                gz.scatter_add_(1, own_idx, torch.where(own, at_s, 0.0))
    ce = None
    if hard:
        m1, l1 = stats[1] if T != 1.0 else (m, log_sum)
        ce = (m1 - g_all[:, -1]) + l1
    row_loss = mixed_loss(D, ce, a, rows)
    if not want:
        return row_loss, None
    if kernels is not None:
        f = torch.where(rows, factor.to(acc), 0.0).expand(N)
        y = torch.where(y_ok, y_local, -1).contiguous() if hard else None
        sparse = None
        if at_s is not None:
            sparse = (torch.where(own, own_idx, -1).contiguous(), at_s.to(acc).contiguous())
        consts = torch.stack([c.to(acc), f, rows.to(acc)]).contiguous()
        return row_loss, kernels.slice_grad(x, t_dense, glob, consts, y, sparse, opts)
    g = soft_grad(gz, opts, logq)
    if hard:
        logq1 = logq if T == 1.0 else (xf - m1[:, None]) - l1[:, None]
        g.add_(logq1.exp(), alpha=a)
        if Vr:
            g.scatter_add_(1, y_local[:, None], (y_ok.to(acc) * -a)[:, None])
    scale_grad_(g, factor, rows)
    return row_loss, g.to(x.dtype)


def _own_values(v: Tensor, own: Tensor, local: Tensor) -> Tensor:
    """(N, j) values of the slice ``v`` (N, V_r) at the local columns ``local`` where this rank
    owns the class (``own``), 0 elsewhere: summed over the ranks, every class's value."""
    # A slice of no class (a rank may hold none) owns nothing and gathers nothing.
    if not v.shape[1]:
        return torch.zeros(local.shape, dtype=v.dtype, device=v.device)
    return torch.where(own, v.gather(1, local), 0.0)


class ShardedDistillation(torch.autograd.Function):
    """The loss of the whole vocabulary from this rank's slice; the slice's gradient is computed
    in forward (unit factors per row for "none") and scaled in backward."""

    @staticmethod
    def forward(ctx, x, teacher_logits, ids, log_probs, target, opts, sl):  # type: ignore[override]
        scale = core.mean_scale(x.shape[0], target, opts, x)
        factor = scale if not opts.per_row else torch.ones((), dtype=scale.dtype, device=x.device)
        teacher = Teacher(teacher_logits, ids, log_probs)
        rows, grad = sharded_rows(x, teacher, target, opts, sl, factor)
        ctx.grad, ctx.per_row = grad, opts.per_row
        return core.reduce(rows, scale, opts)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        g = grad_output.to(ctx.grad.dtype)
        grad = ctx.grad * (g[:, None] if ctx.per_row else g)
        ctx.grad = None
        return grad, None, None, None, None, None, None


def distillation_loss_sharded(
    who: str,
    x: Tensor,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
    group: object,
    v0: int,
    V: int,
) -> Tensor:
    """``distillation_loss`` of the slice ``x`` (N, V_r) of global classes [v0, v0 + V_r) (rows
    flattened, checked, agreed: ``agree``) over ``group``: the (reduced) loss of the whole
    vocabulary, identical on every rank."""
    ValueCheck(who, V, teacher, target, opts.ignore_index).run(defer=False)
    sl = VocabSlice(v0, V, group)
    if torch.is_grad_enabled() and x.requires_grad:
        return ShardedDistillation.apply(x, *teacher, target, opts, sl)
    scale = core.mean_scale(x.shape[0], target, opts, x)
    rows, _ = sharded_rows(x, teacher, target, opts, sl, None)
    return core.reduce(rows, scale, opts)


def linear_pass(
    x: Tensor,
    head: tuple[Tensor, Tensor | None],
    dense: TeacherHead | None,
    teacher: Teacher,
    target: Tensor | None,
    plan: tuple[DistillOptions, int, VocabSlice],
    factor: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The fused head on this rank's slice W (V_r, D) (``plan``: the options, the chunk rows and
    the slice): (row losses, grad_x all-reduced over the group, grad_W of the slice, grad_b of
    the slice); the gradients with ``factor`` only."""
    opts, chunk_rows, sl = plan
    W, b = head
    N = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc, device=x.device)
    want = factor is not None
    per_row = want and factor.dim() == 1
    # Summed in the accumulation dtype: grad_x once more over the ranks.
    gx = torch.zeros(N, x.shape[1], dtype=acc, device=x.device) if want and needs[0] else None
    gw = torch.zeros(W.shape, dtype=acc, device=x.device) if want and needs[1] else None
    gb = torch.zeros(W.shape[0], dtype=acc, device=x.device) if want and needs[2] else None
    for rows, x_c, logits, t_c in core.teacher_chunks(x, head, dense, teacher, chunk_rows):
        f = (factor[rows] if per_row else factor) if want else None
        y = target[rows] if target is not None else None
        loss[rows], g = sharded_rows(logits, t_c, y, opts, sl, f)
        if g is None:
            continue
        if gx is not None:
            gx[rows] = g @ W
        if gw is not None:
            gw += g.t() @ x_c
        if gb is not None:
            gb += g.sum(0, dtype=acc)
    if gx is not None:
        dist.all_reduce(gx, group=sl.group)  # every slice's part of the input's gradient
    return loss, _cast(gx, x), _cast(gw, W), _cast(gb, b) if b is not None else None


def _cast(t: Tensor | None, like: Tensor) -> Tensor | None:
    return t.to(like.dtype) if t is not None else None


class ShardedLinearDistillation(torch.autograd.Function):
    """The fused head over vocabulary slices: scalar reductions compute the gradients in
    forward; "none" runs the slices' loop again in backward with each row's factor."""

    @staticmethod
    def forward(ctx, x, W, b, tx, tW, tb, ids, log_probs, target, opts, rows, sl):  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        dense = TeacherHead.of(tx, tW, tb)
        plan = (opts, rows, sl)
        args = ((W, b), dense, Teacher(None, ids, log_probs), target, plan)
        if opts.per_row:
            loss, *_ = linear_pass(x, *args, None, needs)
            ctx.save_for_backward(x, W, b, tx, tW, tb, ids, log_probs, target)
            ctx.grads = None
        else:
            scale = core.mean_scale(x.shape[0], target, opts, x)
            row_loss, *grads = linear_pass(x, *args, scale, needs)
            loss = core.reduce(row_loss, scale, opts)
            ctx.grads = grads
        ctx.plan, ctx.needs = plan, needs
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.grads is None:
            x, W, b, tx, tW, tb, ids, log_probs, target = ctx.saved_tensors
            factor = core.row_factor(grad_output, x)
            args = ((W, b), TeacherHead.of(tx, tW, tb), Teacher(None, ids, log_probs), target)
            _, gx, gw, gb = linear_pass(x, *args, ctx.plan, factor, ctx.needs)
        else:
            gx, gw, gb = (g * grad_output.to(g.dtype) if g is not None else None for g in ctx.grads)
            ctx.grads = None
        return (gx, gw, gb) + (None,) * 9


def linear_distillation_loss_sharded(
    who: str,
    tensors: tuple[Tensor | None, ...],
    opts: DistillOptions,
    chunk_rows: int,
    agreed: tuple[int, int],
    group: object,
) -> Tensor:
    """``linear_distillation_loss`` on this rank's slice of the heads' classes (``tensors``:
    x (N, D), W (V_r, D), b, the dense teacher's x, W, b, the sparse teacher's ids and
    log-probabilities, target; checked and agreed, ``agree`` gave (v0, V)) over ``group``."""
    v0, V = agreed
    ids, log_probs, target = tensors[6:]
    ValueCheck(who, V, Teacher(None, ids, log_probs), target, opts.ignore_index).run(defer=False)
    sl = VocabSlice(v0, V, group)
    return ShardedLinearDistillation.apply(*tensors, opts, chunk_rows, sl)
