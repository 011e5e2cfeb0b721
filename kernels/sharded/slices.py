"""The local maths of the sharded losses on one rank's slice of the vocabulary, and the combine.

A slice holds the logits z (M, V_r) of the classes [start, start + V_r). Per row it gives its
max, its sum of exponentials relative to that max, and the target terms (``local_stats`` with
torch ops, or ``rows_stats``: one forward launch of the row contract of ``fusedce.core``, the
Triton kernel on GPUs and the torch backend on the CPU, for class indices without label
smoothing or statistics). ``combine`` runs the two all-reduces of the forward (the row max,
then ONE stacked sum relative to the global max) and gives the loss, the global max and
log-sum and the coefficient of softmax(z) in the gradient. The gradient of a slice is this
slice of the global gradient (``local_grad`` with torch ops, or ``rows_grad``: one
gradient-only launch of the row contract). Everything is shift-exact: sums travel relative to
the row max, and the gradient reads exp((z - max) - log_sum), never exp(z - lse).

``set_row_contract(False)`` runs every call on the torch ops instead of the row contract (the
tests compare both).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import core
from ..backends.torch_ops import transformed_logits
from ..options import LossOptions
from .agreement import Shard

# Class indices without label smoothing or return_stats: the slices' rows go through the row
# contract (``core.run_rows``: the Triton kernel, or the torch backend). Off: torch ops for
# every call (``set_row_contract``).
_ROWS_ON_BACKEND = True
# The ignored class of the launches on a slice: never a local class (those are >= 0).
_LOCAL_IGNORE = -1


def set_row_contract(enabled: bool) -> bool:
    """Whether the common case (class indices, no label smoothing, no ``return_stats``) of the
    sharded losses runs on the row contract of ``fusedce.core`` (True, the default) or on torch
    ops like every other case (False): the same results to rounding, for comparisons. Applies to
    the calls that start afterwards, in this process. Returns the previous setting."""
    global _ROWS_ON_BACKEND
    if not isinstance(enabled, bool):
        raise TypeError(f"set_row_contract: enabled must be a bool, got {type(enabled).__name__}")
    previous, _ROWS_ON_BACKEND = _ROWS_ON_BACKEND, enabled
    return previous


class SliceTargets:
    """Per-row target terms of a slice. Class indices: ``hard`` = (1 - eps) w_y (0 on ignored
    and out-of-range rows), ``y`` the global class (0 where there is none), ``y_loc`` the class
    within the slice (0 elsewhere), ``owned`` whether this slice holds it, ``valid`` / ``bad``
    masks, ``smooth`` = eps / V and ``a`` the coefficient of lse. Probabilities: the slice's
    coefficients are built per chunk. Also the options (the logit transform, the z-loss), the
    (M,) token weights ``tw`` (or None) and whether the statistics are wanted."""

    def __init__(
        self,
        target: Tensor,
        weight: Tensor | None,
        opts: LossOptions,
        sh: Shard,
        acc: torch.dtype,
        token_weight: Tensor | None = None,
        want_stats: bool = False,
    ) -> None:
        eps = opts.label_smoothing
        self.opts, self.start, self.stats = opts, sh.start, want_stats
        self.tw = token_weight
        self.soft = target.dim() == 2
        self.eps, self.smooth = eps, eps / sh.vocab
        self.w_loc = None if weight is None else weight[sh.start : sh.start + sh.width]
        self.on_rows = False
        if self.soft:
            self.valid = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
            return
        y = target.long()
        self.valid = y != opts.ignore_index
        y_ok = self.valid & (y >= 0) & (y < sh.vocab)
        self.bad = self.valid & ~y_ok
        self.y = torch.where(y_ok, y, 0)
        self.owned = y_ok & (y >= sh.start) & (y < sh.start + sh.width)
        self.y_loc = torch.where(self.owned, y - sh.start, 0)
        hard = y_ok.to(acc) * (1.0 - eps)
        if weight is not None:
            hard = hard * weight[self.y]
        self.hard = hard
        w_sum = float(sh.vocab) if weight is None else weight.sum()
        self.a = torch.where(self.valid, hard + self.smooth * w_sum, 0.0)
        self.width = sh.width
        # The slice's rows go through the backend's row contract (see rows_stats).
        self.on_rows = _ROWS_ON_BACKEND and eps == 0.0 and not want_stats and sh.width > 0
        if self.on_rows:
            self.local_opts = dataclasses.replace(
                opts, ignore_index=_LOCAL_IGNORE, label_smoothing=0.0, z_loss=0.0
            )
            self.y_fwd = torch.where(self.owned, self.y_loc, _LOCAL_IGNORE)
            self._grad_rows: tuple[Tensor, Tensor] | None = None
            self._grad_rows_known = False

    def grad_rows(self) -> tuple[Tensor, Tensor] | None:
        """(M,) local targets and (V_r,) weights of the gradient launch on the row contract, or
        None when it cannot be mapped (then the torch ops write the gradient).

        The launch must give a row whose class lies in another slice a * softmax(z) and no
        true-class term: such a row points at a local class ``c`` whose weight is set to 0 in
        this launch, a class that no row of this slice targets with a non-zero weight (so no
        row of the slice loses its true-class term). With more classes than rows one always
        exists; otherwise one host read decides."""
        if self._grad_rows_known:
            return self._grad_rows
        self._grad_rows_known = True
        width, dev = self.width, self.y.device
        w = (
            self.w_loc.clone()
            if self.w_loc is not None
            else torch.ones(width, dtype=self.hard.dtype, device=dev)
        )
        targeted = torch.zeros(width + 1, dtype=torch.bool, device=dev)
        targeted[torch.where(self.owned, self.y_loc, width)] = True
        free = ~targeted[:width] | (w == 0)
        c = free.to(torch.uint8).argmax()  # the first free class
        if width <= self.y.shape[0] and not bool(free[c]):
            return None
        w.index_fill_(0, c.reshape(1), 0.0)
        y = torch.where(self.valid, c, _LOCAL_IGNORE)
        y = torch.where(self.bad, width, y)  # out of range here too: NaN rows, as the torch ops
        self._grad_rows = (torch.where(self.owned, self.y_loc, y), w)
        return self._grad_rows

    def soft_coef(self, t: Tensor, acc: torch.dtype) -> Tensor:
        coef = (1.0 - self.eps) * t.to(acc) + self.smooth
        return coef.mul_(self.w_loc) if self.w_loc is not None else coef


# The argmax of probability targets travels in the row-max all-reduce as a float64 whose bits
# are the int64 key 2**52 + u * 2**30 + (2**30 - 1 - c): u the order-preserving uint32 of the
# probability (as float32) and c the global class. Such keys are positive normal float64
# values, ordered as the integers: their MAX is the largest probability, then the lowest class
# (torch.argmax's first maximum). It needs V <= 2**30.
_KEY_BASE, KEY_CLASS_BITS = 2**52, 30


def _target_key(t: Tensor, start: int) -> Tensor:
    """(m,) float64 keys of the row maxima of probability rows t (m, V_r) (0.0 for V_r = 0)."""
    if t.shape[1] == 0:
        return torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
    bits = t.float().view(torch.int32).long()
    u = torch.where(bits >= 0, bits, -(2**31) - 1 - bits) + 2**31
    cls = torch.arange(start, start + t.shape[1], device=t.device)
    key = (u << KEY_CLASS_BITS) + (2**KEY_CLASS_BITS - 1 - cls) + _KEY_BASE
    return key.amax(1).view(torch.float64)


def _key_class(key: Tensor) -> Tensor:
    """The global class of float64 keys of ``_target_key``."""
    low = key.view(torch.int64) & (2**KEY_CLASS_BITS - 1)
    return 2**KEY_CLASS_BITS - 1 - low


def local_stats(x: Tensor, rows: slice, tt: SliceTargets, target: Tensor) -> tuple[Tensor, ...]:
    """For a chunk of rows x (m, V_r) in the accumulation dtype, with z = the transformed
    logits: the row max of z, the sum of exp(z - max), B = sum_c b_c (z_c - max) and
    S = sum_c b_c, with b_c the coefficient of z_c in the loss (true class, smoothing, or
    probability). With the statistics also E = sum_c exp(z_c - max) (z_c - max) (entropy), the
    global index of the first maximum of z and, for probabilities, the key of their argmax."""
    z, _ = transformed_logits(x, tt.opts, need_derivative=False)
    width = z.shape[1]
    m = z.amax(1) if width else z.new_full((z.shape[0],), float("-inf"))
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    zs = z - m_safe[:, None]
    e = zs.exp()
    sumexp = e.sum(1)
    if tt.soft:
        coef = tt.soft_coef(target[rows], z.dtype)
        B = torch.where(coef != 0, coef * zs, 0.0).sum(1)
        S = coef.sum(1)
    else:
        owned, valid = tt.owned[rows], tt.valid[rows]
        hard = torch.where(owned, tt.hard[rows], 0.0)
        # Only where the slice holds the class (elsewhere 0 * a -inf logit would give NaN).
        z_y = zs.gather(1, tt.y_loc[rows, None])[:, 0] if width else torch.zeros_like(m)
        B = torch.where(hard != 0, hard * z_y, 0.0)
        S = hard
        if tt.eps > 0.0:
            w = tt.w_loc
            if w is None:
                wx, ws = zs.sum(1), float(width)
            else:  # 0 * -inf counts as 0 where a class weight is 0
                wx, ws = torch.where(w != 0, zs, 0.0) @ w, w.sum()
            B = B + torch.where(valid, tt.smooth * wx, 0.0)
            S = S + torch.where(valid, tt.smooth * ws, 0.0)
    out = [m, m_safe, sumexp, B, S]
    if tt.stats:
        out.append(torch.where(e > 0, e * zs, 0.0).sum(1))  # 0 * log 0 = 0
        first = z.argmax(1) if width else torch.zeros(z.shape[0], dtype=torch.int64)
        out.append(first.to(z.device) + tt.start)
        if tt.soft:
            out.append(_target_key(target[rows], tt.start))
    return tuple(out)


def _unit_stride(x: Tensor) -> Tensor:
    """x (m, V_r) with unit stride along the classes, as the row contract takes it."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def rows_stats(x: Tensor, rows: slice, tt: SliceTargets) -> tuple[Tensor, ...]:
    """``local_stats`` of a chunk of rows x (m, V_r) from one forward launch of the row
    contract (``core.run_rows``), for class indices without smoothing or statistics.

    The launch sees the slice as a whole row: targets outside it are ignored there, no class
    weights, no z-loss or token weights (``combine`` adds those from the global lse). It gives
    per row the slice's max m and log-sum of z and, where the slice holds the target, the loss
    (m - z_y) + log_sum, so that B = w_y (z_y - m) = -w_y (loss - log_sum). A slice whose row
    has no finite logit (a masked or padded part of the vocabulary) has a log-sum of -inf and
    adds nothing."""
    x = _unit_stride(x)
    stats = core.new_stats(x.shape[0], x.dtype, x.device)
    core.run_rows(x, tt.y_fwd[rows], None, tt.local_opts, stats)
    m_safe, log_sum = stats[core.MAX], stats[core.LOG_SUM]
    empty = log_sum == float("-inf")
    m = torch.where(empty, float("-inf"), m_safe)
    hard = torch.where(tt.owned[rows], tt.hard[rows], 0.0)
    B = torch.where(hard != 0, -hard * (stats[core.LOSS] - log_sum), 0.0)
    return m, m_safe, log_sum.exp(), B, hard


def rows_grad(
    x: Tensor,
    rows: slice,
    tt: SliceTargets,
    mapped: tuple[Tensor, Tensor],
    g_max: Tensor,
    log_sum: Tensor,
    a: Tensor,
    f: Tensor,
    out: Tensor,
) -> None:
    """``local_grad`` written into ``out`` (m, V_r) by one gradient-only launch of the row
    contract: it reads the GLOBAL max, log-sum and coefficient a (with the z-loss's
    2 lambda lse) and writes f * (a softmax(z) - w_y onehot) dz/dx, which is this slice of the
    global gradient (``mapped``: the targets and weights of ``SliceTargets.grad_rows``)."""
    x = _unit_stride(x)
    stats = core.new_stats(x.shape[0], x.dtype, x.device)
    stats[core.MAX].copy_(g_max[rows])
    stats[core.LOG_SUM].copy_(log_sum[rows])
    stats[core.COEF].copy_(a[rows])
    y, w = mapped
    scale = f.to(stats.dtype).contiguous()
    core.run_rows(x, y[rows], w, tt.local_opts, stats, out, scale, grad_only=True)


def slice_log_probs(z: Tensor, rows: slice, g_max: Tensor, log_sum: Tensor) -> Tensor:
    """log softmax of a chunk of rows z (m, V_r) from the global max and log-sum: shift-exact."""
    return (z - g_max[rows, None]).sub_(log_sum[rows, None])


def local_grad(
    x: Tensor,
    rows: slice,
    tt: SliceTargets,
    target: Tensor,
    g_max: Tensor,
    log_sum: Tensor,
    a: Tensor,
    f: Tensor,
) -> Tensor:
    """d(f_i l_i) / d x for a chunk of rows (m, V_r), in the accumulation dtype: through the
    logit transform; ``a`` the coefficient of softmax(z) (with the z-loss's 2 lambda lse);
    ``f`` () or (m,) (token weights included)."""
    z, dz = transformed_logits(x, tt.opts, need_derivative=True)
    f_row = f[:, None] if f.dim() else f
    g = slice_log_probs(z, rows, g_max, log_sum).exp_().mul_(a[rows, None] * f_row)
    if tt.soft:
        g.sub_(tt.soft_coef(target[rows], z.dtype).mul_(f_row))
        return g.mul_(dz) if dz is not None else g
    valid, bad = tt.valid[rows], tt.bad[rows]
    fm = f.expand(z.shape[0]) if f.dim() == 0 else f
    if z.shape[1]:
        hard = torch.where(tt.owned[rows], tt.hard[rows], 0.0) * fm
        g.scatter_add_(1, tt.y_loc[rows, None], -hard[:, None])
    if tt.eps > 0.0:
        w = (
            tt.w_loc
            if tt.w_loc is not None
            else torch.ones(z.shape[1], dtype=z.dtype, device=z.device)
        )
        g.addr_(torch.where(valid, tt.smooth * fm, 0.0), w.to(z.device), alpha=-1.0)
    if dz is not None:
        g.mul_(dz)  # the chain rule through the scale and the softcap
    g.masked_fill_(~valid[:, None], 0.0)
    return g.masked_fill_(bad[:, None], float("nan"))


def join_chunks(
    parts: list[tuple[Tensor, ...]], tt: SliceTargets, acc: torch.dtype, device: torch.device
) -> list[Tensor]:
    """The per-chunk statistics of ``local_stats`` joined over the chunks.

    Args:
        parts: each chunk's statistics (one tensor of its rows per statistic).
        tt: the targets (which statistics exist: the extras, soft targets).
        acc: the accumulation dtype (of the empty columns when there is no chunk).
        device: where the empty columns go.

    Returns:
        One (M,) tensor per statistic.
    """
    if not parts:
        n = 5 + (2 + tt.soft if tt.stats else 0)
        cols = [torch.empty(0, dtype=acc, device=device) for _ in range(n)]
        if tt.stats:
            cols[6] = torch.empty(0, dtype=torch.int64, device=device)
            if tt.soft:
                cols[7] = torch.empty(0, dtype=torch.float64, device=device)
        return cols
    return [torch.cat(column) for column in zip(*parts, strict=True)]


class Combined(NamedTuple):
    """The rows after the two all-reduces."""

    loss: Tensor  # (M,) t_i (l_i + lambda lse_i**2), NaN on bad rows
    g_max: Tensor  # (M,) the global row max of z (0 where no logit is finite)
    log_sum: Tensor  # (M,) log sum_c exp(z_c - g_max) over the whole vocabulary
    a: Tensor  # (M,) coefficient of softmax(z) in the gradient (with 2 lambda lse)
    extras: Tensor | None  # (4, M): z-loss part, lse, entropy, correct (1.0 / 0.0)


def combine(stats: list[Tensor], tt: SliceTargets, sh: Shard, acc: torch.dtype) -> Combined:
    """The two all-reduces: the row max (with the probability argmax key when the statistics
    are wanted), then ONE stacked sum."""
    m, m_safe, sumexp, B, S = stats[:5]
    inf = float("-inf")
    if tt.stats and tt.soft:
        top = torch.stack([m.to(torch.float64), stats[7]])
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=sh.group)
        g_max, y_top = top[0].to(acc), _key_class(top[1])
    else:
        g_max = m.clone()
        dist.all_reduce(g_max, op=dist.ReduceOp.MAX, group=sh.group)
    g_safe = torch.where(g_max == inf, 0.0, g_max)
    empty = m == inf  # no finite logit in this slice's row: it adds nothing
    shift = torch.where(empty, 0.0, m_safe - g_safe)
    factor = torch.where(empty, 0.0, shift.exp())
    parts = [sumexp * factor, B + torch.where(S != 0, shift * S, 0.0)]
    if tt.soft:
        parts.append(S)  # a = sum of all coefficients: spread over the slices
    if tt.stats:
        # Relative to the global max: sum_c e^(z_c - g) (z_c - g), for the entropy.
        parts.append(factor * (stats[5] + shift * sumexp))
        # torch.argmax takes the first maximum: the slice's first maximum counts when the
        # slice holds the global max; y is right when it is such a first maximum and no lower
        # class is one (the slices are contiguous in rank order).
        y = y_top if tt.soft else tt.y
        top_here = (m == g_max) & (sh.width > 0)
        first = stats[6]
        parts.append((top_here & (first == y)).to(acc))
        parts.append((top_here & (first < y)).to(acc))
    buf = torch.stack(parts).to(acc)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=sh.group)
    log_sum = buf[0].log()
    a = buf[2] if tt.soft else tt.a.to(acc)
    # l = a * lse - sum_c b_c z_c, both relative to the global max.
    loss = a * log_sum - buf[1]
    if not tt.soft:
        loss = torch.where(tt.valid, loss, 0.0)
    lse = g_safe + log_sum
    lam = tt.opts.z_loss
    z_part = torch.where(tt.valid, lam * lse * lse, 0.0) if lam > 0.0 else None
    a_grad = a + torch.where(tt.valid, (2.0 * lam) * lse, 0.0) if lam > 0.0 else a
    if z_part is not None:
        loss = loss + z_part
    if tt.tw is not None:
        loss = loss * tt.tw
        z_part = z_part * tt.tw if z_part is not None else None
    if not tt.soft:
        loss = torch.where(tt.bad, float("nan"), loss)
    extras = None
    if tt.stats:
        k = 3 if tt.soft else 2
        entropy = log_sum - buf[k] / buf[0]
        correct = (buf[k + 1] > 0.5) & (buf[k + 2] < 0.5)
        if not tt.soft:
            correct = correct & tt.valid & ~tt.bad
        if z_part is None:
            z_part = torch.zeros_like(lse)
        extras = torch.stack([z_part, lse, entropy, correct.to(acc)])
    return Combined(loss, g_safe, log_sum, a_grad, extras)


def normaliser(
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    acc: torch.dtype,
    mean: bool,
    token_weight: Tensor | None = None,
) -> Tensor:
    """The factor of the summed row losses: 1 / (the mean's denominator) for "mean", else 1.

    Args:
        target: (M,) class indices or (M, V_r) probabilities of this rank's rows.
        weight: (V_r,) class weights of this slice, or None.
        ignore_index: the ignored class.
        acc: the accumulation dtype of the result.
        mean: whether the reduction is "mean".
        token_weight: (M,) per-row weights, or None.

    Returns:
        () tensor of dtype ``acc``.
    """
    if not mean:
        return torch.ones((), dtype=acc, device=target.device)
    denom = core.mean_normaliser(target, weight, ignore_index, acc, token_weight)
    return core.inverse_normaliser(denom)


def reduce_rows(loss_rows: Tensor, inv: Tensor, reduction: str) -> Tensor:
    """The loss of the (M,) row losses: themselves ("none"), their sum, or the sum times
    ``inv`` (the ``normaliser``, "mean")."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total * inv.to(total.dtype) if reduction == "mean" else total


def row_factor(
    grad_output: Tensor,
    inv: Tensor,
    reduction: str,
    acc: torch.dtype,
    token_weight: Tensor | None,
) -> Tensor:
    """Each row's factor of its gradient in backward: the upstream gradient ((M,) for "none",
    else () times ``inv``), times the row's token weight where given; () or (M,) of ``acc``."""
    if reduction == "none":
        f = grad_output.reshape(-1).to(acc)
    else:
        f = (grad_output.reshape(()) * inv).to(acc)
    return f * token_weight if token_weight is not None else f
