"""Vocabulary-parallel cross-entropy and linear head over ``torch.distributed``.

With tensor parallelism the output layer is split by vocabulary rows: rank r holds the logits (or
the weight rows) of a contiguous class range [start_r, start_r + V_r), the ranges in rank order
and of any sizes. These functions compute the loss of the full vocabulary from the slices without
gathering them:

* ``vocab_parallel_cross_entropy(local_logits, target, ...)``: logits (N, V_r) (or (C_r,),
  (N, C_r, d1, ...)), or a ``DTensor`` sharded on the class dimension of a 1-D mesh;
* ``vocab_parallel_linear_cross_entropy(input, local_weight, target, ...)``: replicated hidden
  states (..., D) and the weight rows (V_r, D) of this rank, chunked over the token rows.

Per call (sizes learnt, the default): one ``all_gather`` of a few int64 per rank (the slice
sizes and a fingerprint of the arguments, so that a bad or mismatched input makes EVERY rank
raise the same exception instead of leaving some rank waiting in a collective); then two
``all_reduce`` of O(N) floats in forward (the row maxima; one stacked buffer of the sums of
exponentials, the target terms and the probability mass of the target coefficients), none in
backward for the cross-entropy, and one of the input gradient (N, D) in the backward of the
linear head. Nothing sent depends on V.

The local math uses torch ops in float32 (float64 for float64 input), in row chunks. The fused
row contract of ``fusedce.core`` is not used for the slices: its statistics are those of whole
rows (the log-sum-exp of the row, smoothing over the row's width, class indices inside the row),
while a slice needs partial sums to combine across ranks first.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import core, index_check
from .linear_chunks import planned_chunk_rows
from .options import (
    REDUCTIONS,
    accumulation_dtype,
    check_chunk_size,
    check_class_index_dtype,
    check_options,
    index_target_for_kernels,
)

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

_CE = "vocab_parallel_cross_entropy"
_LCE = "vocab_parallel_linear_cross_entropy"
# Exception classes that travel between ranks as a code in the metadata exchange.
_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    IndexError,
    RuntimeError,
    NotImplementedError,
)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------
# Groups, slices and the agreement of the ranks
# --------------------------------------------------------------------------------------------


class _Shard(NamedTuple):
    """This rank's place in the vocabulary."""

    group: object  # the process group
    start: int  # first global class of the slice
    width: int  # V_r
    vocab: int  # V, the global number of classes


def _resolve_group(process_group: object) -> object | None:
    """The group to reduce over, or None for the plain (unsharded) function."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _check_explicit_sizes(
    who: str, vocab_start: object, vocab_size: object, width: int
) -> tuple[int, int] | None:
    """Validates ``vocab_start`` / ``vocab_size`` (both or neither); None when not given."""
    if vocab_start is None and vocab_size is None:
        return None
    if vocab_start is None or vocab_size is None:
        raise ValueError(f"{who}: pass both vocab_start and vocab_size, or neither")
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__}")
    if vocab_size < 1 or not 0 <= vocab_start <= vocab_start + width <= vocab_size:
        raise ValueError(
            f"{who}: a slice of {width} classes starting at vocab_start={vocab_start} does not "
            f"fit in vocab_size={vocab_size}"
        )
    return vocab_start, vocab_size


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _shape_key(shape: tuple[int, ...]) -> int:
    # hash() of a tuple of ints is the same in every process (no string hashing involved).
    return hash(shape) & _INT64_MAX


class _Meta(NamedTuple):
    """What the ranks must agree on, and what each one contributes (one int64 row per rank)."""

    width: int
    rows: int
    out_shape: tuple[int, ...]
    soft: bool
    features: int  # D of the linear head, 0 for the cross-entropy
    dtype: torch.dtype
    weight_numel: int  # -1 without class weights
    opts_key: tuple[int, int, int]  # reduction, ignore_index, smoothing bits


_FIELDS = (
    "error",
    "slice width",
    "number of rows",
    "target / output shape",
    "target kind (indices or probabilities)",
    "number of input features D",
    "input dtype",
    "number of class weights",
    "reduction",
    "ignore_index",
    "label_smoothing",
    "smallest class index",
    "largest class index",
    "class-index fingerprint",
)
_AGREE = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)  # columns that must be equal on every rank


def _target_summary(target: Tensor | None, ignore_index: int) -> list[Tensor]:
    """Device scalars (min, max, fingerprint) of the non-ignored class indices: equal on every
    rank when the targets are (probabilities, or no target: zeros)."""
    if target is None or target.dim() != 1 or target.numel() == 0:
        return [torch.zeros((), dtype=torch.int64)] * 3
    t = target.long()
    valid = t != ignore_index
    lo = torch.where(valid, t, _INT64_MAX).min()
    hi = torch.where(valid, t, -1).max()
    # int64 arithmetic wraps identically on every rank: a cheap checksum of the whole target.
    mult = torch.arange(t.numel(), device=t.device) % 65521 + 1
    return [lo, hi, (t * mult).sum()]


def _agree(
    who: str,
    group: object,
    device: torch.device,
    error: Exception | None,
    meta: _Meta | None,
    target: Tensor | None,
    ignore_index: int,
) -> _Shard:
    """One all_gather of a few int64 per rank: learns the slice sizes and checks that the ranks
    agree. Every rank reaches the same verdict from the same table, so every rank raises the
    same exception (or none): no rank is left waiting in a later collective."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if error is not None or meta is None:
        code = next((i + 1 for i, cls in enumerate(_ERRORS) if isinstance(error, cls)), 4)
        row = torch.zeros(len(_FIELDS), dtype=torch.int64, device=device)
        row[0] = code
    else:
        host = [
            0,
            meta.width,
            meta.rows,
            _shape_key(meta.out_shape),
            int(meta.soft),
            meta.features,
            _DTYPES.index(meta.dtype) if meta.dtype in _DTYPES else -1,
            meta.weight_numel,
            *meta.opts_key,
        ]
        summary = [s.to(device) for s in _target_summary(target, ignore_index)]
        row = torch.cat(
            [torch.tensor(host, dtype=torch.int64, device=device), torch.stack(summary)]
        )
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).tolist()  # the one host sync of the metadata

    failed = [r for r in range(world) if table[r][0] != 0]
    if failed:
        # Every rank knows that some rank failed: all of them take part in this second exchange.
        messages: list[object] = [None] * world
        dist.all_gather_object(messages, str(error) if error is not None else "", group=group)
        first = failed[0]
        cls = _ERRORS[table[first][0] - 1]
        raise cls(f"{who}: rank {first} of {world} rejected its arguments: {messages[first]}")
    for col in _AGREE:
        values = [table[r][col] for r in range(world)]
        if len(set(values)) > 1:
            if col in (11, 12, 13):
                raise ValueError(
                    f"{who}: the class-index target differs across ranks; it must hold the "
                    "same global class indices on every rank"
                )
            shown = values if col not in (3, 10) else "they differ"
            raise ValueError(f"{who}: the ranks disagree on the {_FIELDS[col]}: {shown}")
    widths = [table[r][1] for r in range(world)]
    vocab = sum(widths)
    if vocab == 0:
        raise ValueError(f"{who}: the slices hold 0 classes in all (widths {widths})")
    weight_numel = table[0][7]
    if weight_numel not in (-1, vocab):
        raise ValueError(
            f"{who}: weight must be a 1-D tensor of all {vocab} class weights (the full "
            f"vocabulary, slices of widths {widths}), got {weight_numel} elements"
        )
    lo, hi = table[0][11], table[0][12]
    if index_check.target_check_enabled() and lo <= hi and (lo < 0 or hi >= vocab):
        _raise_bad_index(who, lo if lo < 0 else hi, vocab, ignore_index)
    return _Shard(group, sum(widths[:rank]), widths[rank], vocab)


def _raise_bad_index(who: str, value: int, vocab: int, ignore_index: int) -> None:
    raise IndexError(
        f"{who}: target class index {value} is out of bounds for {vocab} classes (valid: "
        f"0..{vocab - 1}, or ignore_index={ignore_index})"
    )


def _explicit_shard(
    who: str,
    group: object,
    sizes: tuple[int, int],
    width: int,
    weight: Tensor | None,
    target: Tensor | None,
    ignore_index: int,
) -> _Shard:
    """The slice as the caller gave it; the checks are this rank's alone (no exchange)."""
    start, vocab = sizes
    if weight is not None and weight.numel() != vocab:
        raise ValueError(
            f"{who}: weight must be a 1-D tensor of all {vocab} class weights, got "
            f"{weight.numel()} elements"
        )
    if index_check.target_check_enabled() and target is not None and target.dim() == 1:
        lo, hi, _ = torch.stack(_target_summary(target, ignore_index)).tolist()  # one sync
        if lo <= hi and (lo < 0 or hi >= vocab):
            _raise_bad_index(who, lo if lo < 0 else hi, vocab, ignore_index)
    return _Shard(group, start, width, vocab)


def _check_weight(who: str, weight: object, device: torch.device) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{who}: weight must be a 1-D tensor of the V class weights, got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"{who}: weight must be floating point, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"{who}: weight is on {weight.device} but input is on {device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{who}: the loss is not differentiable with respect to the class weights "
            "(weight.requires_grad=True); pass weight.detach()"
        )


# --------------------------------------------------------------------------------------------
# The local math on a slice
# --------------------------------------------------------------------------------------------


class _Targets:
    """Per-row target terms of a slice. Class indices: ``hard`` = (1 - eps) w_y (0 on ignored
    and out-of-range rows), ``y_loc`` the class within the slice (0 elsewhere), ``owned``
    whether this slice holds it, ``valid`` / ``bad`` masks, ``smooth`` = eps / V and ``a`` the
    coefficient of lse. Probabilities: the slice's coefficients are built per chunk."""

    def __init__(
        self,
        target: Tensor,
        weight: Tensor | None,
        eps: float,
        ignore_index: int,
        sh: _Shard,
        acc: torch.dtype,
    ) -> None:
        self.soft = target.dim() == 2
        self.eps, self.smooth = eps, eps / sh.vocab
        self.w_loc = None if weight is None else weight[sh.start : sh.start + sh.width]
        if self.soft:
            return
        y = target.long()
        self.valid = y != ignore_index
        y_ok = self.valid & (y >= 0) & (y < sh.vocab)
        self.bad = self.valid & ~y_ok
        y_safe = torch.where(y_ok, y, 0)
        self.owned = y_ok & (y >= sh.start) & (y < sh.start + sh.width)
        self.y_loc = torch.where(self.owned, y - sh.start, 0)
        hard = y_ok.to(acc) * (1.0 - eps)
        if weight is not None:
            hard = hard * weight[y_safe]
        self.hard = hard
        w_sum = float(sh.vocab) if weight is None else weight.sum()
        self.a = torch.where(self.valid, hard + self.smooth * w_sum, 0.0)

    def soft_coef(self, t: Tensor, acc: torch.dtype) -> Tensor:
        coef = (1.0 - self.eps) * t.to(acc) + self.smooth
        return coef.mul_(self.w_loc) if self.w_loc is not None else coef


def _local_stats(x: Tensor, rows: slice, tt: _Targets, target: Tensor) -> tuple[Tensor, ...]:
    """For a chunk of rows x (m, V_r) in the accumulation dtype: the row max, the sum of
    exp(x - max), B = sum_c b_c (x_c - max) and S = sum_c b_c, with b_c the coefficient of x_c
    in the loss (true class, smoothing, or probability)."""
    m = x.amax(1) if x.shape[1] else x.new_full((x.shape[0],), float("-inf"))
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    xs = x - m_safe[:, None]
    sumexp = xs.exp().sum(1)
    if tt.soft:
        coef = tt.soft_coef(target[rows], x.dtype)
        B = torch.where(coef != 0, coef * xs, 0.0).sum(1)
        S = coef.sum(1)
        return m, m_safe, sumexp, B, S
    owned, valid = tt.owned[rows], tt.valid[rows]
    hard = torch.where(owned, tt.hard[rows], 0.0)
    B = hard * xs.gather(1, tt.y_loc[rows, None])[:, 0] if x.shape[1] else torch.zeros_like(m)
    S = hard
    if tt.eps > 0.0:
        w = tt.w_loc
        if w is None:
            wx, ws = xs.sum(1), float(x.shape[1])
        else:  # 0 * -inf counts as 0 where a class weight is 0
            wx, ws = torch.where(w != 0, xs, 0.0) @ w, w.sum()
        B = B + torch.where(valid, tt.smooth * wx, 0.0)
        S = S + torch.where(valid, tt.smooth * ws, 0.0)
    return m, m_safe, sumexp, B, S


def _local_grad(
    x: Tensor, rows: slice, tt: _Targets, target: Tensor, lse: Tensor, a: Tensor, f: Tensor
) -> Tensor:
    """d(f_i l_i) / d x for a chunk of rows (m, V_r), in the accumulation dtype; ``f`` is ()
    or (m,)."""
    f_row = f[:, None] if f.dim() else f
    g = (x - lse[rows, None]).exp_().mul_(a[rows, None] * f_row)
    if tt.soft:
        return g.sub_(tt.soft_coef(target[rows], x.dtype).mul_(f_row))
    valid, bad = tt.valid[rows], tt.bad[rows]
    fm = f.expand(x.shape[0]) if f.dim() == 0 else f
    if x.shape[1]:
        hard = torch.where(tt.owned[rows], tt.hard[rows], 0.0) * fm
        g.scatter_add_(1, tt.y_loc[rows, None], -hard[:, None])
    if tt.eps > 0.0:
        w = (
            tt.w_loc
            if tt.w_loc is not None
            else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        )
        g.addr_(torch.where(valid, tt.smooth * fm, 0.0), w.to(x.device), alpha=-1.0)
    g.masked_fill_(~valid[:, None], 0.0)
    return g.masked_fill_(bad[:, None], float("nan"))


def _join_chunks(parts: list[tuple[Tensor, ...]], acc: torch.dtype, device) -> list[Tensor]:
    """The per-chunk statistics of ``_local_stats`` as five (M,) tensors."""
    if not parts:
        return [torch.empty(0, dtype=acc, device=device)] * 5
    return [torch.cat(column) for column in zip(*parts, strict=True)]


def _combine(stats: list[Tensor], tt: _Targets, sh: _Shard, acc: torch.dtype) -> tuple[Tensor, ...]:
    """The two all-reduces: the row max, then ONE stacked sum. Returns (per-row loss, lse, a)."""
    m, m_safe, sumexp, B, S = stats
    g_max = m.clone()
    dist.all_reduce(g_max, op=dist.ReduceOp.MAX, group=sh.group)
    g_safe = torch.where(g_max == float("-inf"), 0.0, g_max)
    shift = m_safe - g_safe
    parts = [sumexp * shift.exp(), B + torch.where(S != 0, shift * S, 0.0)]
    if tt.soft:
        parts.append(S)  # a = sum of all coefficients: spread over the slices
    buf = torch.stack(parts).to(acc)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=sh.group)
    log_sum = buf[0].log()
    a = buf[2] if tt.soft else tt.a.to(acc)
    # l = a * lse - sum_c b_c x_c, both relative to the global max.
    loss = a * log_sum - buf[1]
    if not tt.soft:
        loss = torch.where(tt.valid, loss, 0.0)
        loss = torch.where(tt.bad, float("nan"), loss)
    return loss, g_safe + log_sum, a


def _normaliser(target: Tensor, weight: Tensor | None, ignore_index: int, acc, mean: bool):
    if not mean:
        return torch.ones((), dtype=acc, device=target.device)
    return core.inverse_normaliser(core.mean_normaliser(target, weight, ignore_index, acc))


def _reduce(loss_rows: Tensor, inv: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total * inv.to(total.dtype) if reduction == "mean" else total


def _row_factor(grad_output: Tensor, inv: Tensor, reduction: str, acc) -> Tensor:
    if reduction == "none":
        return grad_output.reshape(-1).to(acc)
    return (grad_output.reshape(()) * inv).to(acc)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: local pass, two all-reduces. Backward: the local slice of the gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, sh, ignore_index, eps, reduction):  # type: ignore[override]
        acc = accumulation_dtype(logits.dtype)
        tt = _Targets(target, weight, eps, ignore_index, sh, acc)
        M, width = logits.shape
        # Row chunks bound the float32 temporaries (the plain head's budget for its logits).
        step = planned_chunk_rows(M, max(width, 1), torch.float32, None, logits.device)
        parts = []
        for r0 in range(0, M, step):
            rows = slice(r0, min(M, r0 + step))
            parts.append(_local_stats(logits[rows].to(acc), rows, tt, target))
        stats = _join_chunks(parts, acc, logits.device)
        loss_rows, lse, a = _combine(stats, tt, sh, acc)
        inv = _normaliser(target, weight, ignore_index, acc, reduction == "mean")
        ctx.save_for_backward(logits, target, lse, a, inv)
        ctx.tt, ctx.reduction, ctx.step = tt, reduction, step
        return _reduce(loss_rows, inv, reduction)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        logits, target, lse, a, inv = ctx.saved_tensors
        tt, acc = ctx.tt, lse.dtype
        f_all = _row_factor(grad_output, inv, ctx.reduction, acc)
        grad_logits = grad_target = None
        M = logits.shape[0]
        if ctx.needs_input_grad[0]:
            grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if ctx.needs_input_grad[1]:
            grad_target = torch.empty_like(target, memory_format=torch.contiguous_format)
        for r0 in range(0, M, ctx.step):
            rows = slice(r0, min(M, r0 + ctx.step))
            f = f_all[rows] if f_all.dim() else f_all
            x = logits[rows].to(acc)
            if grad_target is not None:
                # d l / d t_c = -(1 - eps) w_c (x_c - lse)
                gt = (x - lse[rows, None]).mul_(-(1.0 - tt.eps))
                if tt.w_loc is not None:
                    gt.mul_(tt.w_loc)
                grad_target[rows] = gt.mul_(f[:, None] if f.dim() else f)
            if grad_logits is not None:
                grad_logits[rows] = _local_grad(x, rows, tt, target, lse, a, f)
        return grad_logits, grad_target, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# vocab_parallel_cross_entropy
# --------------------------------------------------------------------------------------------


def _flatten_ce(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, tuple[int, ...], bool]:
    """Checks one rank's tensors; returns (logits (M, V_r), target (M,) or (M, V_r), output
    shape, whether the targets are probabilities)."""
    who = _CE
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: local_logits and target must be tensors")
    if not input.is_floating_point():
        raise TypeError(f"{who}: local_logits must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: local_logits must have shape (C_r,), (N, C_r) or (N, C_r, ...)")
    if target.device != input.device:
        raise ValueError(f"{who}: target is on {target.device} but input is on {input.device}")
    _check_weight(who, weight, input.device)
    class_dim = 0 if input.dim() == 1 else 1
    width = input.shape[class_dim]
    soft = target.shape == input.shape and target.is_floating_point()
    if soft:
        if ignore_index >= 0:
            raise ValueError(f"{who}: ignore_index is not supported for probability targets")
    else:
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if class_dim else ()
        if tuple(target.shape) != expected:
            raise ValueError(
                f"{who}: target of shape {tuple(target.shape)} does not fit local_logits of "
                f"shape {tuple(input.shape)}: expected global class indices of shape "
                f"{expected} or this slice's probabilities of shape {tuple(input.shape)}"
            )
        check_class_index_dtype(who, target)
        target = index_target_for_kernels(target, ignore_index)
    out_shape = tuple(input.shape[:class_dim]) + tuple(input.shape[class_dim + 1 :])
    if input.dim() == 1:
        logits, target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:  # (N, C_r, d1, ...) -> (N * d1 * ..., C_r)
        logits = input.movedim(1, -1).reshape(-1, width)
        target = target.movedim(1, -1).reshape(-1, width) if soft else target.reshape(-1)
    return logits, target, out_shape, soft


def _dtensor_cross_entropy(
    input, target, weight, ignore_index, reduction, label_smoothing, process_group, sizes
) -> Tensor:
    """A DTensor sharded on the class dimension of a 1-D mesh: the local slices on the mesh's
    group; the loss comes back as a replicated DTensor (as under ``loss_parallel()``)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = input.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{_CE}: a DTensor input must live on a 1-D device mesh")
    if process_group is not None:
        raise ValueError(f"{_CE}: a DTensor input reduces over its mesh; pass no process_group")
    class_dim = 1 if input.dim() >= 2 else 0
    (place,) = input.placements
    if not place.is_shard() or place.dim % input.dim() != class_dim:
        raise ValueError(
            f"{_CE}: a DTensor input must be sharded on the class dimension (Shard({class_dim})"
            f"), got {input.placements}"
        )

    def local(t, name):
        if isinstance(t, DTensor):
            if not all(p.is_replicate() for p in t.placements):
                raise ValueError(f"{_CE}: a DTensor {name} must be replicated")
            return t.to_local()
        return t

    loss = vocab_parallel_cross_entropy(
        input.to_local(),
        local(target, "target"),
        local(weight, "weight"),
        ignore_index,
        reduction,
        label_smoothing,
        process_group=mesh.get_group(),
        vocab_start=sizes[0] if sizes else None,
        vocab_size=sizes[1] if sizes else None,
    )
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    process_group: object = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Cross-entropy of logits split by class over the ranks of ``process_group``.

    Rank r holds the logits of the classes [start_r, start_r + V_r): contiguous ranges in rank
    order, any sizes. The result is the same on every rank and equals
    ``fusedce.cross_entropy`` of the concatenated logits; each rank's gradient is its slice of
    that function's gradient.

    Reductions done here (do not all-reduce again): forward all-reduces (MAX) the (M,) row maxima
    and then (SUM) one stacked (2, M) buffer ((3, M) for probabilities); backward communicates
    nothing: each rank gets exactly its slice of the gradient. Without ``vocab_start`` /
    ``vocab_size`` one all_gather of a few int64 per rank comes first (see Raises).

    Args:
        local_logits: this rank's logits: (C_r,), (N, C_r) or (N, C_r, d1, ..., dk); float32,
            float16, bfloat16 or float64. Or a ``DTensor`` sharded on the class dimension
            (``Shard(1)``, or ``Shard(-1)`` for 2-D) of a 1-D mesh: its mesh's group is used and
            the loss is returned as a replicated DTensor (as ``loss_parallel()`` does).
        target: GLOBAL class indices (int64, int32 or uint8) of shape (), (N,) or
            (N, d1, ..., dk), the same on every rank; or this rank's slice of the class
            probabilities, of the shape of ``local_logits`` (may require grad).
        weight: optional FULL (V,) class weights, the same on every rank.
        ignore_index: class index that contributes neither loss nor gradient.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        label_smoothing: amount in [0, 1] of uniform smoothing over all V classes.
        process_group: the group the vocabulary is split over; None: the default group when
            ``torch.distributed`` is initialised, else the plain function. A group of size 1 is
            the plain ``fusedce.cross_entropy``.
        vocab_start: first global class of this rank's slice; with ``vocab_size`` it replaces
            the all_gather of the slice sizes (and the checks that come with it).
        vocab_size: V, the global number of classes.

    Returns:
        The loss, float32 (float64 for float64 logits): a scalar, or the target's shape for
        reduction="none"; identical on every rank.

    Raises:
        ValueError, TypeError: bad shapes, dtypes or options; ranks that disagree on the number
            of rows, the target, the options or the dtype; a weight that is not (V,).
        IndexError: a class index outside [0, V) other than ignore_index.
        With the sizes learnt (the default) every rank raises the same exception, also when
        only one rank's arguments are bad, and none is left waiting in a collective. With
        ``vocab_start`` / ``vocab_size`` given each rank checks only its own arguments: errors
        in the (replicated) target or weight still raise on every rank, but a rank-specific
        one raises on that rank alone, and the others wait until the group's timeout.
    """
    sizes_given = vocab_start is not None or vocab_size is not None
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(local_logits, DTensor):
            sizes = (vocab_start, vocab_size) if sizes_given else None
            return _dtensor_cross_entropy(
                local_logits,
                target,
                weight,
                ignore_index,
                reduction,
                label_smoothing,
                process_group,
                sizes,
            )
    group = _resolve_group(process_group)
    if group is None or dist.get_world_size(group) == 1:
        from .cross_entropy_loss import cross_entropy

        if isinstance(local_logits, Tensor) and local_logits.dim() > 0:
            width = local_logits.shape[0 if local_logits.dim() == 1 else 1]
            _check_explicit_sizes(_CE, vocab_start, vocab_size, width)
            if sizes_given and (vocab_start, vocab_size) != (0, width):
                raise ValueError(f"{_CE}: one rank holds all classes: vocab_start=0, V={width}")
        return cross_entropy(local_logits, target, weight, ignore_index, reduction, label_smoothing)

    error: Exception | None = None
    meta = logits = t = None
    explicit = None
    try:
        opts = check_options(_CE, ignore_index, label_smoothing, reduction)
        logits, t, out_shape, soft = _flatten_ce(local_logits, target, weight, opts.ignore_index)
        explicit = _check_explicit_sizes(_CE, vocab_start, vocab_size, logits.shape[1])
        meta = _Meta(
            width=logits.shape[1],
            rows=logits.shape[0],
            out_shape=out_shape,
            soft=soft,
            features=0,
            dtype=logits.dtype,
            weight_numel=-1 if weight is None else weight.numel(),
            opts_key=(
                REDUCTIONS.index(opts.reduction),
                opts.ignore_index,
                _float_bits(opts.label_smoothing),
            ),
        )
    except (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError) as exc:
        if sizes_given:
            raise
        error = exc
    if explicit is None:
        device = local_logits.device if isinstance(local_logits, Tensor) else torch.device("cpu")
        ii = ignore_index if isinstance(ignore_index, int) else -100
        sh = _agree(_CE, group, device, error, meta, t if meta else None, ii)
    else:
        sh = _explicit_shard(_CE, group, explicit, meta.width, weight, t, opts.ignore_index)
    w = None if weight is None else weight.detach().to(accumulation_dtype(logits.dtype))
    loss = _VocabParallelCrossEntropy.apply(
        logits, t, w, sh, opts.ignore_index, opts.label_smoothing, opts.reduction
    )
    return loss.reshape(meta.out_shape) if opts.per_row else loss


# --------------------------------------------------------------------------------------------
# vocab_parallel_linear_cross_entropy
# --------------------------------------------------------------------------------------------


def _linear_logits(x: Tensor, W: Tensor, b: Tensor | None, acc: torch.dtype) -> Tensor:
    return torch.nn.functional.linear(x, W, b).to(acc)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Forward: the local logits chunk by chunk (never (N, V_r) at once), two all-reduces.
    Backward: the chunks again, the local weight / bias gradients, and ONE all-reduce of the
    input gradient."""

    @staticmethod
    def forward(ctx, x, W, b, target, weight, sh, ignore_index, eps, reduction, step):  # type: ignore[override]
        acc = accumulation_dtype(x.dtype)
        tt = _Targets(target, weight, eps, ignore_index, sh, acc)
        M = x.shape[0]
        parts = []
        for r0 in range(0, M, step):
            rows = slice(r0, min(M, r0 + step))
            parts.append(_local_stats(_linear_logits(x[rows], W, b, acc), rows, tt, target))
        stats = _join_chunks(parts, acc, x.device)
        loss_rows, lse, a = _combine(stats, tt, sh, acc)
        inv = _normaliser(target, weight, ignore_index, acc, reduction == "mean")
        ctx.save_for_backward(x, W, b, target, lse, a, inv)
        ctx.tt, ctx.reduction, ctx.step, ctx.sh = tt, reduction, step, sh
        return _reduce(loss_rows, inv, reduction)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        x, W, b, target, lse, a, inv = ctx.saved_tensors
        tt, acc, sh = ctx.tt, lse.dtype, ctx.sh
        f_all = _row_factor(grad_output, inv, ctx.reduction, acc)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        M = x.shape[0]
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        gw = torch.zeros(W.shape, dtype=acc, device=W.device) if need_w else None
        gb = (
            torch.zeros(W.shape[0], dtype=acc, device=W.device)
            if need_b and b is not None
            else None
        )
        for r0 in range(0, M, ctx.step):
            rows = slice(r0, min(M, r0 + ctx.step))
            f = f_all[rows] if f_all.dim() else f_all
            g = _local_grad(_linear_logits(x[rows], W, b, acc), rows, tt, target, lse, a, f)
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


def _check_linear(
    who: str,
    input: object,
    W: object,
    target: object,
    b: object,
    weight: object,
) -> None:
    for arg, what in ((input, "input"), (W, "local_weight"), (target, "target")):
        if not isinstance(arg, Tensor):
            raise TypeError(f"{who}: {what} must be a tensor, got {type(arg).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{who}: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: input must have shape (D,), (N, D) or (..., D), got a scalar")
    if W.dim() != 2:
        raise ValueError(f"{who}: local_weight must be 2-D (V_r, D), got {tuple(W.shape)}")
    Vr, D = W.shape
    if input.shape[-1] != D:
        raise ValueError(
            f"{who}: input has {input.shape[-1]} features but local_weight of shape {(Vr, D)} "
            f"expects D={D}"
        )
    if W.dtype != input.dtype:
        raise TypeError(f"{who}: input ({input.dtype}) and local_weight ({W.dtype}) differ")
    if b is not None:
        if not isinstance(b, Tensor) or tuple(b.shape) != (Vr,):
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{who}: linear_bias must be this slice's ({Vr},), got {shape}")
        if b.dtype != input.dtype:
            raise TypeError(f"{who}: linear_bias ({b.dtype}) must have the input's dtype")
    for t, what in ((W, "local_weight"), (target, "target"), (b, "linear_bias")):
        if t is not None and t.device != input.device:
            raise ValueError(f"{who}: {what} is on {t.device} but input is on {input.device}")
    if target.is_floating_point():
        raise NotImplementedError(f"{who}: probability targets are not supported")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{who}: target of shape {tuple(target.shape)} does not fit input of shape "
            f"{tuple(input.shape)}: expected {tuple(input.shape[:-1])}"
        )
    check_class_index_dtype(who, target)
    _check_weight(who, weight, input.device)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    process_group: object = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """``cross_entropy(linear(input, W, b), target)`` with W split by rows over the ranks.

    Rank r holds the rows [start_r, start_r + V_r) of the (V, D) output weight (contiguous
    ranges in rank order, any sizes) and of the bias; ``input`` is replicated. The loss is the
    same on every rank and equals ``fusedce.linear_cross_entropy`` with the full weight. The
    (N, V_r) logits are never materialised: at most ``chunk_size`` rows at a time.

    Reductions done here (do not all-reduce again): forward all-reduces (MAX) the (N,) row
    maxima and then (SUM) one stacked (2, N) buffer; backward all-reduces (SUM) the (N, D) input
    gradient in float32, so ``input.grad`` is the FULL gradient on every rank (``input`` must
    then require grad on every rank or on none). The gradients of
    ``local_weight`` and ``linear_bias`` are this rank's slices and are not reduced. Without
    ``vocab_start`` / ``vocab_size`` one all_gather of a few int64 per rank comes first.

    Args:
        input: (D,), (N, D) or (..., D) hidden states, the same on every rank; float32,
            float16, bfloat16 or float64.
        local_weight: (V_r, D) this rank's rows of the output weight; input's dtype.
        target: GLOBAL class indices (int64, int32 or uint8) of shape ``input.shape[:-1]``,
            the same on every rank.
        linear_bias: optional (V_r,) this rank's slice of the bias; input's dtype.
        weight: optional FULL (V,) class weights.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        ignore_index: class index that contributes neither loss nor gradient (None: -100).
        label_smoothing: amount in [0, 1] of uniform smoothing over all V classes.
        chunk_size: token rows per chunk; None picks the plain function's default for V_r.
        process_group: as in :func:`vocab_parallel_cross_entropy`; a group of size 1 is the
            plain ``fusedce.linear_cross_entropy``.
        vocab_start: first global class of this rank's rows (with ``vocab_size``: no
            all_gather of the sizes).
        vocab_size: V, the global number of classes.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or ``input.shape[:-1]`` for
        reduction="none"; identical on every rank.

    Raises:
        As :func:`vocab_parallel_cross_entropy` (the ranks also agree on D);
        NotImplementedError: probability targets.
    """
    group = _resolve_group(process_group)
    if group is None or dist.get_world_size(group) == 1:
        from .linear_cross_entropy_loss import linear_cross_entropy

        if isinstance(local_weight, Tensor) and local_weight.dim() == 2:
            width = local_weight.shape[0]
            sizes = _check_explicit_sizes(_LCE, vocab_start, vocab_size, width)
            if sizes is not None and sizes != (0, width):
                raise ValueError(f"{_LCE}: one rank holds all classes: vocab_start=0, V={width}")
        return linear_cross_entropy(
            input,
            local_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            chunk_size=chunk_size,
        )

    sizes_given = vocab_start is not None or vocab_size is not None
    error: Exception | None = None
    meta = t = None
    explicit = None
    try:
        opts = check_options(_LCE, ignore_index, label_smoothing, reduction)
        check_chunk_size(_LCE, chunk_size)
        _check_linear(_LCE, input, local_weight, target, linear_bias, weight)
        width, D = local_weight.shape
        explicit = _check_explicit_sizes(_LCE, vocab_start, vocab_size, width)
        x = input.reshape(-1, D)
        t = index_target_for_kernels(target.reshape(-1), opts.ignore_index)
        meta = _Meta(
            width=width,
            rows=x.shape[0],
            out_shape=tuple(target.shape),
            soft=False,
            features=D,
            dtype=x.dtype,
            weight_numel=-1 if weight is None else weight.numel(),
            opts_key=(
                REDUCTIONS.index(opts.reduction),
                opts.ignore_index,
                _float_bits(opts.label_smoothing),
            ),
        )
    except (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError) as exc:
        if sizes_given:
            raise
        error = exc
    if explicit is None:
        device = input.device if isinstance(input, Tensor) else torch.device("cpu")
        ii = -100 if ignore_index is None else ignore_index
        ii = ii if isinstance(ii, int) else -100
        sh = _agree(_LCE, group, device, error, meta, t if meta else None, ii)
    else:
        sh = _explicit_shard(_LCE, group, explicit, meta.width, weight, t, opts.ignore_index)
    w = None if weight is None else weight.detach().to(accumulation_dtype(x.dtype))
    step = planned_chunk_rows(x.shape[0], max(sh.width, 1), x.dtype, chunk_size, x.device)
    loss = _VocabParallelLinearCrossEntropy.apply(
        x,
        local_weight,
        linear_bias,
        t,
        w,
        sh,
        opts.ignore_index,
        opts.label_smoothing,
        opts.reduction,
        step,
    )
    return loss.reshape(meta.out_shape) if opts.per_row else loss


def wants_vocab_parallel(input: Tensor, process_group: object) -> bool:
    """Whether a call of the plain functions goes here: a process group was given, or the input
    is a ``DTensor`` (``torch.distributed.tensor``)."""
    if process_group is not None:
        return True
    if type(input) is Tensor or not isinstance(input, Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(input, DTensor)


_UNSHARDED_DEFAULTS = {
    "inplace_backward": False,
    "logit_scale": 1.0,
    "softcap": None,
    "z_loss": 0.0,
    "token_weight": None,
    "return_stats": False,
    "accumulation": "float32",
}


def refuse_unsharded_options(who: str, **options: object) -> None:
    """Raises NotImplementedError naming the options, among those of ``_UNSHARDED_DEFAULTS``,
    that are not at their defaults: the sharded loss does not take them (yet)."""
    asked = []
    for name, value in options.items():
        default = _UNSHARDED_DEFAULTS[name]
        same = value is None if default is None else (value is not None and value == default)
        if not same:
            asked.append(name)
    if asked:
        raise NotImplementedError(
            f"{who}: {', '.join(asked)} not supported with a process_group or a DTensor input; "
            "the vocabulary-parallel loss takes weight, ignore_index, reduction and "
            "label_smoothing (and chunk_size, linear_bias for the linear head)"
        )
