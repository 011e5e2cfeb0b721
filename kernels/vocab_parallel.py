"""Vocabulary-parallel cross-entropy and linear head over ``torch.distributed``.

With tensor parallelism the output layer is split by vocabulary rows: rank r holds the logits (or
the weight rows) of a contiguous class range [start_r, start_r + V_r), the ranges in rank order
and of any sizes. These functions compute the loss of the full vocabulary from the slices without
gathering them:

* ``vocab_parallel_cross_entropy(local_logits, target, ...)``: logits (N, V_r) (or (C_r,),
  (N, C_r, d1, ...)), or a ``DTensor`` sharded on the class dimension of a 1-D mesh;
* ``vocab_parallel_linear_cross_entropy(input, local_weight, target, ...)``: replicated hidden
  states (..., D) and the weight rows (V_r, D) of this rank (or a (V, D) ``DTensor`` sharded by
  rows), chunked over the token rows.

Both take the one-pass extras of the plain functions (logit scale, softcap, z-loss, token
weights, ``return_stats``) with the same definitions over the global vocabulary.

Per call: one ``all_gather`` of a few int64 per rank (the slice sizes, ``vocab_start`` /
``vocab_size`` where given, and a fingerprint of the arguments -- shapes, options, the class
indices, the token and class weights -- so that a bad or mismatched input makes EVERY rank raise
the same exception instead of leaving some rank waiting in a collective; skipped only when the
sizes are given and the checks are off, ``set_target_check(False)``); then two
``all_reduce`` of O(N) floats in forward (the row maxima; one stacked buffer of the sums of
exponentials, the target terms, the probability mass of the target coefficients and, with
``return_stats``, the entropy and argmax terms), none in
backward for the cross-entropy, and one of the input gradient (N, D) in the backward of the
linear head. Nothing sent depends on V.

The local math of the common case -- class indices, with or without class weights, logit
scale, softcap, z-loss and token weights, but no label smoothing and no ``return_stats`` --
runs on the row contract of ``fusedce.core`` (``core.run_rows``: the fused Triton kernel on
GPUs and under ``TRITON_INTERPRET=1``, the torch backend on the CPU): one forward launch per
slice treats the slice as a whole row (targets elsewhere ignored) and gives the slice's max,
log-sum and, where the slice holds the target, the loss, which combine across ranks as partial
sums relative to the global max; one gradient-only launch reads back the GLOBAL max, log-sum
and lse coefficient and writes exactly this slice of the global gradient (``_rows_stats``,
``_rows_grad``). Everything is shift-exact: sums are exchanged relative to the row max, and the
gradient reads exp((z - max) - log_sum), never exp(z - lse). Everything else (smoothing over
the global V, probability targets, the statistics' global argmax) uses torch ops in float32
(float64 for float64 input), in row chunks. The communication is the same either way.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import core, index_check
from .backends.torch_ops import transformed_logits
from .core import CrossEntropyStats
from .linear_chunks import planned_chunk_rows
from .options import (
    REDUCTIONS,
    LossOptions,
    accumulation_dtype,
    check_chunk_size,
    check_class_index_dtype,
    check_extras,
    check_options,
    check_token_weight,
    index_target_for_kernels,
    prepare_token_weight,
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
# Class indices without label smoothing or return_stats: the slices' rows go through the row
# contract (``core.run_rows``: the Triton kernel, or the torch backend). Off: torch ops for
# every call (the tests compare both).
_ROWS_ON_BACKEND = True
# The ignored class of the launches on a slice: never a local class (those are >= 0).
_LOCAL_IGNORE = -1


# --------------------------------------------------------------------------------------------
# Groups, slices and the agreement of the ranks
# --------------------------------------------------------------------------------------------


class _Shard(NamedTuple):
    """This rank's place in the vocabulary."""

    group: object  # the process group
    start: int  # first global class of the slice
    width: int  # V_r
    vocab: int  # V, the global number of classes


def _resolve_group(who: str, process_group: object) -> object | None:
    """The group to reduce over, or None for the plain (unsharded) function."""
    if process_group is None:
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None
    check_process_group(who, process_group)
    return process_group


def check_process_group(who: str, process_group: object) -> None:
    """``process_group`` (not None) is a ``torch.distributed.ProcessGroup`` of an initialised
    ``torch.distributed`` that this rank belongs to.

    ``torch.distributed.group.WORLD`` is None before ``init_process_group``: passed then, it
    means no group (the plain function), as None does.

    Raises:
        TypeError: not a ProcessGroup (a string, a DeviceMesh, ...). ValueError: this rank is
            outside the group (``new_group`` gave it ``GroupMember.NON_GROUP_MEMBER``).
            RuntimeError: torch.distributed is not initialised (or not built).
    """
    if not dist.is_available():
        raise RuntimeError(
            f"{who}: process_group needs torch.distributed, which this build of torch lacks"
        )
    if type(process_group) is int and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{who}: this rank is not a member of process_group (torch.distributed.new_group "
            "gives GroupMember.NON_GROUP_MEMBER to the ranks outside the group); call the loss "
            "only on the ranks of the group"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        kind = type(process_group).__name__
        hint = "; for a DeviceMesh pass mesh.get_group()" if kind == "DeviceMesh" else ""
        raise TypeError(
            f"{who}: process_group must be a torch.distributed.ProcessGroup or None, got "
            f"{kind}{hint}"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            f"{who}: process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first"
        )


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


def _exchanges(sizes_given: bool) -> bool:
    """Whether the call runs the metadata exchange: always with the sizes learnt; with
    ``vocab_start`` / ``vocab_size`` given only while the checks are on (``set_target_check``),
    and then it checks them against the gathered widths."""
    return not sizes_given or index_check.target_check_enabled()


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
    extras_key: tuple[int, int, int, int]  # logit_scale, softcap (-1: None), z_loss bits; stats
    declared: tuple[int, int] | None = None  # (vocab_start, vocab_size) as given, or None


class _Field(NamedTuple):
    """One int64 column of the metadata row."""

    name: str  # its member of ``_Col``
    what: str  # what the messages call it
    agree: bool = True  # must be equal on every rank
    show: bool = True  # a disagreement shows the values (not for hashes and float bits)
    differs: str | None = None  # the message of a disagreement, instead of the generic one


_TARGET_DIFFERS = (
    "the class-index target differs across ranks; it must hold the same global class indices "
    "on every rank"
)
_WEIGHT_DIFFERS = (
    "weight differs across ranks; the class weights must be the same full (V,) tensor on every "
    "rank, or None on every rank"
)
# The metadata row, in column order (the order of the checks too: the first disagreement found
# is the one reported).
_FIELDS = (
    _Field("ERROR", "error", agree=False),
    _Field("WIDTH", "slice width", agree=False),
    _Field("ROWS", "number of rows"),
    _Field("OUT_SHAPE", "target / output shape", show=False),
    _Field("SOFT", "target kind (indices or probabilities)"),
    _Field("FEATURES", "number of input features D"),
    _Field("DTYPE", "input dtype"),
    _Field("WEIGHT_NUMEL", "number of class weights"),
    _Field("REDUCTION", "reduction"),
    _Field("IGNORE_INDEX", "ignore_index"),
    _Field("SMOOTHING", "label_smoothing", show=False),
    _Field("TARGET_MIN", "smallest class index", differs=_TARGET_DIFFERS),
    _Field("TARGET_MAX", "largest class index", differs=_TARGET_DIFFERS),
    _Field("TARGET_SUM", "class-index fingerprint", differs=_TARGET_DIFFERS),
    _Field("LOGIT_SCALE", "logit_scale", show=False),
    _Field("SOFTCAP", "softcap", show=False),
    _Field("Z_LOSS", "z_loss", show=False),
    _Field("RETURN_STATS", "return_stats"),
    _Field(
        "TOKEN_WEIGHT",
        "token weights",
        differs="token_weight differs across ranks; it must be the same (replicated) tensor on "
        "every rank, or None on every rank",
    ),
    _Field("WEIGHT_SUM", "class-weight sum", differs=_WEIGHT_DIFFERS),
    _Field("WEIGHT_SQUARES", "class-weight sum of squares", differs=_WEIGHT_DIFFERS),
    _Field("WEIGHT_POSITIONS", "class-weight fingerprint", differs=_WEIGHT_DIFFERS),
    # Checked against the gathered widths, not for equality.
    _Field("VOCAB_START", "vocab_start as given (-1: not given)", agree=False),
    _Field("VOCAB_SIZE", "vocab_size as given (-1: not given)", agree=False),
)
# The columns by name: ``row[_Col.ROWS]``.
_Col = enum.IntEnum("_Col", [f.name for f in _FIELDS], start=0)


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


def _token_weight_fingerprint(token_weight: Tensor | None) -> Tensor:
    """A device int64 scalar: -1 without token weights, else the bits of a position-weighted
    float64 sum (the same on every rank when the token weights are)."""
    if token_weight is None:
        return torch.full((), -1, dtype=torch.int64)
    tw = token_weight.detach().reshape(-1).double()
    mult = (torch.arange(tw.numel(), device=tw.device) % 65521 + 1).double()
    return (tw * mult).sum().reshape(1).view(torch.int64)[0]


def _class_weight_fingerprint(weight: Tensor | None) -> list[Tensor]:
    """Device int64 scalars: the bits of the float64 sum, sum of squares and position-weighted
    sum of the class weights (the same on every rank when the weights are; -1 without)."""
    if weight is None:
        return [torch.full((), -1, dtype=torch.int64)] * 3
    w = weight.detach().reshape(-1).double()
    mult = (torch.arange(w.numel(), device=w.device) % 65521 + 1).double()
    sums = torch.stack([w.sum(), (w * w).sum(), (w * mult).sum()])
    return list(sums.view(torch.int64).unbind())


def _agree(
    who: str,
    group: object,
    device: torch.device,
    error: Exception | None,
    meta: _Meta | None,
    target: Tensor | None,
    ignore_index: int,
    token_weight: Tensor | None = None,
    weight: Tensor | None = None,
) -> _Shard:
    """One all_gather of a few int64 per rank: learns the slice sizes and checks that the ranks
    agree (and, where given, that ``vocab_start`` / ``vocab_size`` match the sizes). Every rank
    reaches the same verdict from the same table, so every rank raises the same exception (or
    none): no rank is left waiting in a later collective."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if error is not None or meta is None:
        code = next((i + 1 for i, cls in enumerate(_ERRORS) if isinstance(error, cls)), 4)
        row = torch.zeros(len(_Col), dtype=torch.int64, device=device)
        row[_Col.ERROR] = code
    else:
        host = [0] * len(_Col)
        host[_Col.WIDTH] = meta.width
        host[_Col.ROWS] = meta.rows
        host[_Col.OUT_SHAPE] = _shape_key(meta.out_shape)
        host[_Col.SOFT] = int(meta.soft)
        host[_Col.FEATURES] = meta.features
        host[_Col.DTYPE] = _DTYPES.index(meta.dtype) if meta.dtype in _DTYPES else -1
        host[_Col.WEIGHT_NUMEL] = meta.weight_numel
        host[_Col.REDUCTION], host[_Col.IGNORE_INDEX], host[_Col.SMOOTHING] = meta.opts_key
        (
            host[_Col.LOGIT_SCALE],
            host[_Col.SOFTCAP],
            host[_Col.Z_LOSS],
            host[_Col.RETURN_STATS],
        ) = meta.extras_key
        host[_Col.VOCAB_START], host[_Col.VOCAB_SIZE] = meta.declared or (-1, -1)
        # The fingerprints of tensors stay on the device until the exchange.
        lo, hi, checksum = _target_summary(target, ignore_index)
        w_sum, w_squares, w_positions = _class_weight_fingerprint(weight)
        on_device = {
            _Col.TARGET_MIN: lo,
            _Col.TARGET_MAX: hi,
            _Col.TARGET_SUM: checksum,
            _Col.TOKEN_WEIGHT: _token_weight_fingerprint(token_weight),
            _Col.WEIGHT_SUM: w_sum,
            _Col.WEIGHT_SQUARES: w_squares,
            _Col.WEIGHT_POSITIONS: w_positions,
        }
        row = torch.tensor(host, dtype=torch.int64, device=device)
        row[list(on_device)] = torch.stack([v.to(device) for v in on_device.values()])
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).tolist()  # the one host sync of the metadata

    failed = [r for r in range(world) if table[r][_Col.ERROR] != 0]
    if failed:
        # Every rank knows that some rank failed: all of them take part in this second exchange.
        messages: list[object] = [None] * world
        dist.all_gather_object(messages, str(error) if error is not None else "", group=group)
        first = failed[0]
        cls = _ERRORS[table[first][_Col.ERROR] - 1]
        raise cls(f"{who}: rank {first} of {world} rejected its arguments: {messages[first]}")
    for col, field in zip(_Col, _FIELDS, strict=True):
        if not field.agree:
            continue
        values = [table[r][col] for r in range(world)]
        if len(set(values)) > 1:
            if field.differs is not None:
                raise ValueError(f"{who}: {field.differs}")
            shown = values if field.show else "they differ"
            raise ValueError(f"{who}: the ranks disagree on the {field.what}: {shown}")
    widths = [table[r][_Col.WIDTH] for r in range(world)]
    vocab = sum(widths)
    if vocab == 0:
        raise ValueError(f"{who}: the slices hold 0 classes in all (widths {widths})")
    _check_declared_sizes(who, table, widths)
    weight_numel = table[0][_Col.WEIGHT_NUMEL]
    if weight_numel not in (-1, vocab):
        raise ValueError(
            f"{who}: weight must be a 1-D tensor of all {vocab} class weights (the full "
            f"vocabulary, slices of widths {widths}), got {weight_numel} elements"
        )
    lo, hi = table[0][_Col.TARGET_MIN], table[0][_Col.TARGET_MAX]
    if index_check.target_check_enabled() and lo <= hi and (lo < 0 or hi >= vocab):
        _raise_bad_index(who, lo if lo < 0 else hi, vocab, ignore_index)
    return _Shard(group, sum(widths[:rank]), widths[rank], vocab)


def _check_declared_sizes(who: str, table: list[list[int]], widths: list[int]) -> None:
    """``vocab_start`` / ``vocab_size`` where some rank gave them: the slices are contiguous in
    rank order, so rank r starts at the sum of the earlier widths, and V is their sum."""
    world, vocab = len(widths), sum(widths)
    for r in range(world):
        size = table[r][_Col.VOCAB_SIZE]
        if size >= 0 and size != vocab:
            raise ValueError(
                f"{who}: vocab_size={size} on rank {r} of {world}, but the slices hold {vocab} "
                f"classes in all (widths {widths}, in rank order)"
            )
    for r in range(world):
        start, expected = table[r][_Col.VOCAB_START], sum(widths[:r])
        if table[r][_Col.VOCAB_SIZE] >= 0 and start != expected:
            raise ValueError(
                f"{who}: vocab_start={start} on rank {r} of {world} does not match the slice "
                f"sizes: the slices (widths {widths}) are contiguous in rank order, so the slice "
                f"of rank {r} starts at {expected}"
            )


def _raise_bad_index(who: str, value: int, vocab: int, ignore_index: int) -> None:
    raise IndexError(
        f"{who}: target class index {value} is out of bounds for {vocab} classes (valid: "
        f"0..{vocab - 1}, or ignore_index={ignore_index})"
    )


def _explicit_shard(
    who: str, group: object, sizes: tuple[int, int], width: int, weight: Tensor | None
) -> _Shard:
    """The slice as the caller gave it, with the checks off (``set_target_check(False)``): no
    exchange, so only this rank's own checks."""
    start, vocab = sizes
    if weight is not None and weight.numel() != vocab:
        raise ValueError(
            f"{who}: weight must be a 1-D tensor of all {vocab} class weights, got "
            f"{weight.numel()} elements"
        )
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
        sh: _Shard,
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
        # The slice's rows go through the backend's row contract (see _rows_stats).
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
_KEY_BASE, _KEY_CLASS_BITS = 2**52, 30


def _target_key(t: Tensor, start: int) -> Tensor:
    """(m,) float64 keys of the row maxima of probability rows t (m, V_r) (0.0 for V_r = 0)."""
    if t.shape[1] == 0:
        return torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
    bits = t.float().view(torch.int32).long()
    u = torch.where(bits >= 0, bits, -(2**31) - 1 - bits) + 2**31
    cls = torch.arange(start, start + t.shape[1], device=t.device)
    key = (u << _KEY_CLASS_BITS) + (2**_KEY_CLASS_BITS - 1 - cls) + _KEY_BASE
    return key.amax(1).view(torch.float64)


def _key_class(key: Tensor) -> Tensor:
    """The global class of float64 keys of ``_target_key``."""
    low = key.view(torch.int64) & (2**_KEY_CLASS_BITS - 1)
    return 2**_KEY_CLASS_BITS - 1 - low


def _local_stats(x: Tensor, rows: slice, tt: _Targets, target: Tensor) -> tuple[Tensor, ...]:
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


def _rows_stats(x: Tensor, rows: slice, tt: _Targets) -> tuple[Tensor, ...]:
    """``_local_stats`` of a chunk of rows x (m, V_r) from one forward launch of the row
    contract (``core.run_rows``), for class indices without smoothing or statistics.

    The launch sees the slice as a whole row: targets outside it are ignored there, no class
    weights, no z-loss or token weights (``_combine`` adds those from the global lse). It gives
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


def _rows_grad(
    x: Tensor,
    rows: slice,
    tt: _Targets,
    mapped: tuple[Tensor, Tensor],
    g_max: Tensor,
    log_sum: Tensor,
    a: Tensor,
    f: Tensor,
    out: Tensor,
) -> None:
    """``_local_grad`` written into ``out`` (m, V_r) by one gradient-only launch of the row
    contract: it reads the GLOBAL max, log-sum and coefficient a (with the z-loss's
    2 lambda lse) and writes f * (a softmax(z) - w_y onehot) dz/dx, which is this slice of the
    global gradient (``mapped``: the targets and weights of ``_Targets.grad_rows``)."""
    x = _unit_stride(x)
    stats = core.new_stats(x.shape[0], x.dtype, x.device)
    stats[core.MAX].copy_(g_max[rows])
    stats[core.LOG_SUM].copy_(log_sum[rows])
    stats[core.COEF].copy_(a[rows])
    y, w = mapped
    scale = f.to(stats.dtype).contiguous()
    core.run_rows(x, y[rows], w, tt.local_opts, stats, out, scale, grad_only=True)


def _log_probs(z: Tensor, rows: slice, g_max: Tensor, log_sum: Tensor) -> Tensor:
    """log softmax of a chunk of rows z (m, V_r) from the global max and log-sum: shift-exact."""
    return (z - g_max[rows, None]).sub_(log_sum[rows, None])


def _local_grad(
    x: Tensor,
    rows: slice,
    tt: _Targets,
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
    g = _log_probs(z, rows, g_max, log_sum).exp_().mul_(a[rows, None] * f_row)
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


def _join_chunks(
    parts: list[tuple[Tensor, ...]], tt: _Targets, acc: torch.dtype, device
) -> list[Tensor]:
    """The per-chunk statistics of ``_local_stats`` as (M,) tensors."""
    if not parts:
        n = 5 + (2 + tt.soft if tt.stats else 0)
        cols = [torch.empty(0, dtype=acc, device=device) for _ in range(n)]
        if tt.stats:
            cols[6] = torch.empty(0, dtype=torch.int64, device=device)
            if tt.soft:
                cols[7] = torch.empty(0, dtype=torch.float64, device=device)
        return cols
    return [torch.cat(column) for column in zip(*parts, strict=True)]


class _Combined(NamedTuple):
    """The rows after the two all-reduces."""

    loss: Tensor  # (M,) t_i (l_i + lambda lse_i**2), NaN on bad rows
    g_max: Tensor  # (M,) the global row max of z (0 where no logit is finite)
    log_sum: Tensor  # (M,) log sum_c exp(z_c - g_max) over the whole vocabulary
    a: Tensor  # (M,) coefficient of softmax(z) in the gradient (with 2 lambda lse)
    extras: Tensor | None  # (4, M): z-loss part, lse, entropy, correct (1.0 / 0.0)


def _combine(stats: list[Tensor], tt: _Targets, sh: _Shard, acc: torch.dtype) -> _Combined:
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
    return _Combined(loss, g_safe, log_sum, a_grad, extras)


def _normaliser(
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    acc,
    mean: bool,
    token_weight: Tensor | None = None,
):
    if not mean:
        return torch.ones((), dtype=acc, device=target.device)
    denom = core.mean_normaliser(target, weight, ignore_index, acc, token_weight)
    return core.inverse_normaliser(denom)


def _reduce(loss_rows: Tensor, inv: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total * inv.to(total.dtype) if reduction == "mean" else total


def _row_factor(
    grad_output: Tensor, inv: Tensor, reduction: str, acc, token_weight: Tensor | None
) -> Tensor:
    if reduction == "none":
        f = grad_output.reshape(-1).to(acc)
    else:
        f = (grad_output.reshape(()) * inv).to(acc)
    return f * token_weight if token_weight is not None else f


def _outputs(ctx, c: _Combined, inv: Tensor, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, (4, M) statistics or an empty tensor, () reduced z-loss part): the last two are
    non-differentiable outputs."""
    loss = _reduce(c.loss, inv, reduction)
    if c.extras is None:
        extras = z_red = loss.new_empty(0)
    else:
        extras = c.extras
        z_red = extras[0].sum() * (inv if reduction == "mean" else 1.0)
    ctx.mark_non_differentiable(extras, z_red)
    return loss, extras, z_red


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: local pass, two all-reduces. Backward: the local slice of the gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, token_weight, sh, opts, want_stats):  # type: ignore[override]
        acc = accumulation_dtype(logits.dtype)
        tt = _Targets(target, weight, opts, sh, acc, token_weight, want_stats)
        M, width = logits.shape
        # Row chunks bound the float32 temporaries (the plain head's budget for its logits).
        step = planned_chunk_rows(M, max(width, 1), torch.float32, None, logits.device)
        parts = []
        if tt.on_rows:
            # One launch over all rows (the torch backend works through them in blocks).
            parts = [_rows_stats(logits, slice(0, M), tt)] if M else []
        else:
            for r0 in range(0, M, step):
                rows = slice(r0, min(M, r0 + step))
                parts.append(_local_stats(logits[rows].to(acc), rows, tt, target))
        c = _combine(_join_chunks(parts, tt, acc, logits.device), tt, sh, acc)
        inv = _normaliser(target, weight, opts.ignore_index, acc, opts.mean, token_weight)
        ctx.save_for_backward(logits, target, c.g_max, c.log_sum, c.a, inv)
        ctx.tt, ctx.reduction, ctx.step = tt, opts.reduction, step
        return _outputs(ctx, c, inv, opts.reduction)

    @staticmethod
    def backward(ctx, grad_output, _grad_extras=None, _grad_z=None):  # type: ignore[override]
        logits, target, g_max, log_sum, a, inv = ctx.saved_tensors
        tt, acc = ctx.tt, log_sum.dtype
        f_all = _row_factor(grad_output, inv, ctx.reduction, acc, tt.tw)
        grad_logits = grad_target = None
        M = logits.shape[0]
        if ctx.needs_input_grad[0]:
            grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if ctx.needs_input_grad[1]:
            grad_target = torch.empty_like(target, memory_format=torch.contiguous_format)
        mapped = tt.grad_rows() if tt.on_rows and grad_logits is not None else None
        if mapped is not None:  # class indices: no target gradient
            _rows_grad(logits, slice(0, M), tt, mapped, g_max, log_sum, a, f_all, grad_logits)
            return grad_logits, None, None, None, None, None, None
        for r0 in range(0, M, ctx.step):
            rows = slice(r0, min(M, r0 + ctx.step))
            f = f_all[rows] if f_all.dim() else f_all
            x = logits[rows].to(acc)
            if grad_target is not None:
                # d l / d t_c = -(1 - eps) w_c log softmax(z)_c (the z-loss does not depend on t)
                z, _ = transformed_logits(x, tt.opts, need_derivative=False)
                gt = _log_probs(z, rows, g_max, log_sum).mul_(-(1.0 - tt.eps))
                if tt.w_loc is not None:
                    gt.mul_(tt.w_loc)
                grad_target[rows] = gt.mul_(f[:, None] if f.dim() else f)
            if grad_logits is not None:
                grad_logits[rows] = _local_grad(x, rows, tt, target, g_max, log_sum, a, f)
        return grad_logits, grad_target, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# vocab_parallel_cross_entropy
# --------------------------------------------------------------------------------------------


def _flatten_ce(
    who: str, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, tuple[int, ...], bool]:
    """Checks one rank's tensors; returns (logits (M, V_r), target (M,) or (M, V_r), output
    shape, whether the targets are probabilities)."""
    name = "local_logits" if who == _CE else "input"  # the argument's name in ``who``
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: {name} and target must be tensors")
    if not input.is_floating_point():
        raise TypeError(f"{who}: {name} must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: {name} must have shape (C_r,), (N, C_r) or (N, C_r, ...)")
    if target.device != input.device:
        raise ValueError(f"{who}: target is on {target.device} but {name} is on {input.device}")
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
                f"{who}: target of shape {tuple(target.shape)} does not fit {name} of "
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


def _local_part(who: str, t: object, name: str, shard_dim: int | None = None) -> object:
    """A DTensor argument's local tensor: replicated ones (or sharded on ``shard_dim``)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    ok = all(p.is_replicate() for p in t.placements)
    if shard_dim is not None:
        ok = ok or all(p.is_shard() and p.dim % t.dim() == shard_dim for p in t.placements)
    if not ok:
        kind = "replicated" if shard_dim is None else f"sharded Shard({shard_dim})"
        raise ValueError(f"{who}: a DTensor {name} must be {kind}, got {t.placements}")
    return t.to_local()


def _replicated(result: object, mesh: object) -> object:
    """The loss (and the stats) of a DTensor call as replicated DTensors of ``mesh``."""
    from torch.distributed.tensor import DTensor, Replicate

    def wrap(t: Tensor) -> Tensor:
        return DTensor.from_local(t, mesh, [Replicate()], run_check=False)

    if isinstance(result, tuple):
        loss, stats = result
        return wrap(loss), CrossEntropyStats(*(wrap(t) for t in stats))
    return wrap(result)


def _mesh_of(who: str, dt: Tensor, process_group: object) -> object:
    mesh = dt.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{who}: a DTensor input must live on a 1-D device mesh")
    if process_group is not None:
        raise ValueError(f"{who}: a DTensor input reduces over its mesh; pass no process_group")
    return mesh


def _dtensor_cross_entropy(
    who,
    input,
    target,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    extras,
    process_group,
    vocab_start,
    vocab_size,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """A DTensor sharded on the class dimension of a 1-D mesh: the local slices on the mesh's
    group; the loss (and stats) come back as replicated DTensors (as under ``loss_parallel()``)."""
    mesh = _mesh_of(who, input, process_group)
    class_dim = 1 if input.dim() >= 2 else 0
    (place,) = input.placements
    if not place.is_shard() or place.dim % input.dim() != class_dim:
        raise ValueError(
            f"{who}: a DTensor input must be sharded on the class dimension (Shard({class_dim})"
            f"), got {input.placements}"
        )
    extras = dict(extras, token_weight=_local_part(who, extras["token_weight"], "token_weight"))
    result = call_cross_entropy(
        who,
        input.to_local(),
        _local_part(who, target, "target", class_dim),
        _local_part(who, weight, "weight"),
        ignore_index,
        reduction,
        label_smoothing,
        extras,
        mesh.get_group(),
        vocab_start,
        vocab_size,
    )
    return _replicated(result, mesh)


def _opts_key(opts: LossOptions) -> tuple[int, int, int]:
    """The loss options every rank must agree on, as integers for the metadata exchange."""
    return REDUCTIONS.index(opts.reduction), opts.ignore_index, _float_bits(opts.label_smoothing)


def _extras_key(opts: LossOptions, return_stats: bool) -> tuple[int, int, int, int]:
    cap = -1 if opts.softcap is None else _float_bits(opts.softcap)
    return (_float_bits(opts.logit_scale), cap, _float_bits(opts.z_loss), int(return_stats))


def _check_return_stats(who: str, return_stats: object) -> bool:
    if not isinstance(return_stats, bool):
        raise TypeError(f"{who}: return_stats must be a bool, got {type(return_stats).__name__}")
    return return_stats


def _public_stats(extras: Tensor, z_red: Tensor, per_row: bool, shape: tuple[int, ...]):
    """``CrossEntropyStats`` from the (4, M) rows (z-loss part, lse, entropy, correct)."""
    return CrossEntropyStats(
        extras[0].reshape(shape) if per_row else z_red,
        extras[1].reshape(shape),
        extras[2].reshape(shape),
        (extras[3] != 0).reshape(shape),
    )


def _check_soft_stats_vocab(who: str, sh: _Shard, soft: bool, want_stats: bool) -> None:
    # The same verdict on every rank: V is global.
    if soft and want_stats and sh.vocab > 2**_KEY_CLASS_BITS:
        raise NotImplementedError(
            f"{who}: return_stats with probability targets needs V <= 2**30 classes, got {sh.vocab}"
        )


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy of logits split by class over the ranks of ``process_group``.

    Rank r holds the logits of the classes [start_r, start_r + V_r): contiguous ranges in rank
    order, any sizes. The result is the same on every rank and equals
    ``fusedce.cross_entropy`` of the concatenated logits (with the same options); each rank's
    gradient is its slice of that function's gradient.

    Reductions done here (do not all-reduce again): forward all-reduces (MAX) the (M,) row maxima
    (float64 (2, M) with the argmax key of probability targets when ``return_stats``) and then
    (SUM) one stacked (k, M) buffer: k = 2 ((3 for probabilities), + 3 with ``return_stats``);
    backward communicates nothing: each rank gets exactly its slice of the gradient. One
    all_gather of a few int64 per rank comes first (see Raises), unless ``vocab_start`` /
    ``vocab_size`` are given and the checks are off (``set_target_check(False)``). Under
    ``torch.compile`` the call runs eagerly (a graph break).

    Args:
        local_logits: this rank's logits: (C_r,), (N, C_r) or (N, C_r, d1, ..., dk); float32,
            float16, bfloat16 or float64. Or a ``DTensor`` sharded on the class dimension
            (``Shard(1)``, or ``Shard(-1)`` for 2-D) of a 1-D mesh: its mesh's group is used and
            the loss is returned as a replicated DTensor (as ``loss_parallel()`` does).
        target: GLOBAL class indices (int64, int32 or uint8) of shape (), (N,) or
            (N, d1, ..., dk), the same on every rank; or this rank's slice of the class
            probabilities, of the shape of ``local_logits`` (may require grad).
        weight: optional FULL (V,) class weights, the same on every rank (their values are in
            the ranks' fingerprint).
        ignore_index: class index that contributes neither loss nor gradient.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        label_smoothing: amount in [0, 1] of uniform smoothing over all V classes.
        logit_scale: s > 0; the loss sees z = s * x.
        softcap: c > 0 or None; then z = c * tanh(z / c), after the scale.
        z_loss: lambda >= 0; each non-ignored element adds lambda * lse(z)**2 (lse over all V).
        token_weight: optional float tensor of the per-element loss shape, finite and >= 0,
            the same on every rank (replicated), not differentiated: element i contributes
            t_i * (l_i + lambda * lse_i**2); "mean" divides by sum_i t_i * w_{y_i}.
        return_stats: also return ``CrossEntropyStats`` (z-loss part, lse, entropy, correct)
            of the full vocabulary, identical on every rank (``correct``: the first maximum
            over all V classes, as ``torch.argmax``; for probability targets the target's
            argmax compares the probabilities rounded to float32).
        process_group: the ``torch.distributed.ProcessGroup`` the vocabulary is split over;
            None: the default group when ``torch.distributed`` is initialised, else the plain
            function (``torch.distributed.group.WORLD`` is None before
            ``init_process_group``, so it means the same). A group of size 1 is the plain
            ``fusedce.cross_entropy``.
        vocab_start: first global class of this rank's slice (with ``vocab_size``). The
            exchange checks it: rank r must start at the sum of the earlier ranks' widths. With
            the checks off (``set_target_check(False)``) it is trusted and replaces the
            exchange: nothing is read back to the host.
        vocab_size: V, the global number of classes: the sum of the widths.

    Returns:
        The loss, float32 (float64 for float64 logits): a scalar, or the target's shape for
        reduction="none"; identical on every rank. With ``return_stats`` the tuple
        ``(loss, stats)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes or options; ranks that disagree on the number
            of rows, the target, the token weights, the class weights, the options or the
            dtype; a weight that is not (V,); a ``vocab_start`` / ``vocab_size`` that does not
            match the slice sizes; a ``process_group`` that is not a ProcessGroup (TypeError) or
            does not hold this rank.
        RuntimeError: a ``process_group`` while ``torch.distributed`` is not initialised.
        IndexError: a class index outside [0, V) other than ignore_index.
        Every rank raises the same exception, also when only one rank's arguments are bad, and
        none is left waiting in a collective (the ``process_group`` checks come before any
        collective and raise where the group is bad). With ``vocab_start`` / ``vocab_size``
        given and the checks off there is no exchange: each rank checks only its own
        arguments, and a rank-specific error raises on that rank alone while the others wait
        until the group's timeout.
    """
    extras = {
        "logit_scale": logit_scale,
        "softcap": softcap,
        "z_loss": z_loss,
        "token_weight": token_weight,
        "return_stats": return_stats,
    }
    return call_cross_entropy(
        _CE,
        local_logits,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        extras,
        process_group,
        vocab_start,
        vocab_size,
    )


def call_cross_entropy(
    who: str,
    local_logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    extras: dict[str, object],
    process_group: object,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``vocab_parallel_cross_entropy`` called through the public function ``who`` (which the
    errors name); ``extras``: the one-pass extras by keyword."""
    sizes_given = vocab_start is not None or vocab_size is not None
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(local_logits, DTensor):
            return _dtensor_cross_entropy(
                who,
                local_logits,
                target,
                weight,
                ignore_index,
                reduction,
                label_smoothing,
                extras,
                process_group,
                vocab_start,
                vocab_size,
            )
    group = _resolve_group(who, process_group)
    if group is None or dist.get_world_size(group) == 1:
        from .cross_entropy_loss import _cross_entropy

        if isinstance(local_logits, Tensor) and local_logits.dim() > 0:
            width = local_logits.shape[0 if local_logits.dim() == 1 else 1]
            _check_explicit_sizes(who, vocab_start, vocab_size, width)
            if sizes_given and (vocab_start, vocab_size) != (0, width):
                raise ValueError(f"{who}: one rank holds all classes: vocab_start=0, V={width}")
        return _cross_entropy(
            who,
            local_logits,
            target,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
            False,
            extras["logit_scale"],
            extras["softcap"],
            extras["z_loss"],
            extras["token_weight"],
            extras["return_stats"],
            None,
        )
    return _sharded_cross_entropy(
        who,
        local_logits,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        extras,
        group,
        vocab_start,
        vocab_size,
    )


@torch.compiler.disable
def _sharded_cross_entropy(
    who,
    local_logits,
    target,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    extras,
    group,
    vocab_start,
    vocab_size,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """The sharded call. Run eagerly under ``torch.compile`` (a graph break): the metadata
    exchange reads values back to the host and the autograd Function holds collectives."""
    exchange = _exchanges(vocab_start is not None or vocab_size is not None)
    error: Exception | None = None
    meta = logits = t = tw = None
    explicit = None
    try:
        opts = check_options(who, ignore_index, label_smoothing, reduction)
        opts = check_extras(who, opts, extras["logit_scale"], extras["softcap"], extras["z_loss"])
        want_stats = _check_return_stats(who, extras["return_stats"])
        logits, t, out_shape, soft = _flatten_ce(
            who, local_logits, target, weight, opts.ignore_index
        )
        tw = extras["token_weight"]
        check_token_weight(who, tw, out_shape, logits.device)
        explicit = _check_explicit_sizes(who, vocab_start, vocab_size, logits.shape[1])
        meta = _Meta(
            width=logits.shape[1],
            rows=logits.shape[0],
            out_shape=out_shape,
            soft=soft,
            features=0,
            dtype=logits.dtype,
            weight_numel=-1 if weight is None else weight.numel(),
            opts_key=_opts_key(opts),
            extras_key=_extras_key(opts, want_stats),
            declared=explicit,
        )
    except (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError) as exc:
        if not exchange:
            raise
        error = exc
    if exchange:
        device = local_logits.device if isinstance(local_logits, Tensor) else torch.device("cpu")
        ii = ignore_index if isinstance(ignore_index, int) else -100
        sh = _agree(who, group, device, error, meta, t if meta else None, ii, tw, weight)
    else:
        sh = _explicit_shard(who, group, explicit, meta.width, weight)
    _check_soft_stats_vocab(who, sh, meta.soft, want_stats)
    w = None if weight is None else weight.detach().to(accumulation_dtype(logits.dtype))
    tw = prepare_token_weight(tw, logits.dtype)
    loss, rows, z_red = _VocabParallelCrossEntropy.apply(logits, t, w, tw, sh, opts, want_stats)
    loss = loss.reshape(meta.out_shape) if opts.per_row else loss
    if not want_stats:
        return loss
    return loss, _public_stats(rows, z_red, opts.per_row, meta.out_shape)


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
    def forward(ctx, x, W, b, target, weight, token_weight, sh, opts, want_stats, step):  # type: ignore[override]
        acc = accumulation_dtype(x.dtype)
        tt = _Targets(target, weight, opts, sh, acc, token_weight, want_stats)
        M = x.shape[0]
        parts = []
        for r0 in range(0, M, step):
            rows = slice(r0, min(M, r0 + step))
            logits = _linear_logits(x[rows], W, b, acc)
            if tt.on_rows:
                parts.append(_rows_stats(logits, rows, tt))
            else:
                parts.append(_local_stats(logits, rows, tt, target))
        c = _combine(_join_chunks(parts, tt, acc, x.device), tt, sh, acc)
        inv = _normaliser(target, weight, opts.ignore_index, acc, opts.mean, token_weight)
        ctx.save_for_backward(x, W, b, target, c.g_max, c.log_sum, c.a, inv)
        ctx.tt, ctx.reduction, ctx.step, ctx.sh = tt, opts.reduction, step, sh
        return _outputs(ctx, c, inv, opts.reduction)

    @staticmethod
    def backward(ctx, grad_output, _grad_extras=None, _grad_z=None):  # type: ignore[override]
        x, W, b, target, g_max, log_sum, a, inv = ctx.saved_tensors
        tt, acc, sh = ctx.tt, log_sum.dtype, ctx.sh
        f_all = _row_factor(grad_output, inv, ctx.reduction, acc, tt.tw)
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
                _rows_grad(logits, rows, tt, mapped, g_max, log_sum, a, f, g)
            else:
                g = _local_grad(logits, rows, tt, target, g_max, log_sum, a, f)
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
    wn = "local_weight" if who == _LCE else "linear_weight"  # the argument's name in ``who``
    for arg, what in ((input, "input"), (W, wn), (target, "target")):
        if not isinstance(arg, Tensor):
            raise TypeError(f"{who}: {what} must be a tensor, got {type(arg).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{who}: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{who}: input must have shape (D,), (N, D) or (..., D), got a scalar")
    if W.dim() != 2:
        raise ValueError(f"{who}: {wn} must be 2-D (V_r, D), got {tuple(W.shape)}")
    Vr, D = W.shape
    if input.shape[-1] != D:
        raise ValueError(
            f"{who}: input has {input.shape[-1]} features but {wn} of shape {(Vr, D)} expects D={D}"
        )
    if W.dtype != input.dtype:
        raise TypeError(f"{who}: input ({input.dtype}) and {wn} ({W.dtype}) differ")
    if b is not None:
        if not isinstance(b, Tensor) or tuple(b.shape) != (Vr,):
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{who}: linear_bias must be this slice's ({Vr},), got {shape}")
        if b.dtype != input.dtype:
            raise TypeError(f"{who}: linear_bias ({b.dtype}) must have the input's dtype")
    for t, what in ((W, wn), (target, "target"), (b, "linear_bias")):
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
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``cross_entropy(linear(input, W, b), target)`` with W split by rows over the ranks.

    Rank r holds the rows [start_r, start_r + V_r) of the (V, D) output weight (contiguous
    ranges in rank order, any sizes) and of the bias; ``input`` is replicated. The loss is the
    same on every rank and equals ``fusedce.linear_cross_entropy`` with the full weight (and
    the same options). The (N, V_r) logits are never materialised: at most ``chunk_size`` rows
    at a time.

    Reductions done here (do not all-reduce again): forward all-reduces (MAX) the (N,) row maxima
    and then (SUM) one stacked (2, N) buffer ((5, N)
    with ``return_stats``); backward all-reduces (SUM) the (N, D) input gradient in float32, so
    ``input.grad`` is the FULL gradient on every rank (``input`` must then require grad on every
    rank or on none). The gradients of ``local_weight`` and ``linear_bias`` are this rank's slices
    and are not reduced. One all_gather of a few int64 per rank comes first, unless
    ``vocab_start`` / ``vocab_size`` are given and the checks are off. Under ``torch.compile``
    the call runs eagerly (a graph break).

    Args:
        input: (D,), (N, D) or (..., D) hidden states, the same on every rank; float32,
            float16, bfloat16 or float64.
        local_weight: (V_r, D) this rank's rows of the output weight; input's dtype. Or a
            ``DTensor`` (V, D) sharded ``Shard(0)`` on a 1-D mesh: its mesh's group is used
            and the loss (and stats) come back as replicated DTensors.
        target: GLOBAL class indices (int64, int32 or uint8) of shape ``input.shape[:-1]``,
            the same on every rank.
        linear_bias: optional (V_r,) this rank's slice of the bias; input's dtype.
        weight: optional FULL (V,) class weights.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        ignore_index: class index that contributes neither loss nor gradient (None: -100).
        label_smoothing: amount in [0, 1] of uniform smoothing over all V classes.
        chunk_size: token rows per chunk; None picks the plain function's default for V_r.
        logit_scale, softcap, z_loss, token_weight, return_stats: as in
            :func:`vocab_parallel_cross_entropy` (``token_weight`` of the target's shape).
        process_group: as in :func:`vocab_parallel_cross_entropy`; a group of size 1 is the
            plain ``fusedce.linear_cross_entropy``.
        vocab_start: first global class of this rank's rows (with ``vocab_size``), checked as
            in :func:`vocab_parallel_cross_entropy` (trusted with the checks off: then no
            all_gather).
        vocab_size: V, the global number of classes.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or ``input.shape[:-1]`` for
        reduction="none"; identical on every rank. With ``return_stats`` the tuple
        ``(loss, stats)``.

    Raises:
        As :func:`vocab_parallel_cross_entropy` (the ranks also agree on D);
        NotImplementedError: probability targets.
    """
    extras = {
        "logit_scale": logit_scale,
        "softcap": softcap,
        "z_loss": z_loss,
        "token_weight": token_weight,
        "return_stats": return_stats,
    }
    return call_linear_cross_entropy(
        _LCE,
        input,
        local_weight,
        target,
        linear_bias,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        chunk_size,
        extras,
        process_group,
        vocab_start,
        vocab_size,
    )


def call_linear_cross_entropy(
    who: str,
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int | None,
    extras: dict[str, object],
    process_group: object,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``vocab_parallel_linear_cross_entropy`` called through the public function ``who``
    (which the errors name); ``extras``: the one-pass extras by keyword."""
    if wants_vocab_parallel(local_weight, None):  # a DTensor weight
        name = "local_weight" if who == _LCE else "linear_weight"
        mesh = _mesh_of(who, local_weight, process_group)
        if not all(p.is_shard() and p.dim % 2 == 0 for p in local_weight.placements):
            raise ValueError(
                f"{who}: a DTensor {name} must be sharded by rows (Shard(0)), got "
                f"{local_weight.placements}"
            )
        extras = dict(extras, token_weight=_local_part(who, extras["token_weight"], "token_weight"))
        result = call_linear_cross_entropy(
            who,
            _local_part(who, input, "input"),
            local_weight.to_local(),
            _local_part(who, target, "target"),
            _local_part(who, linear_bias, "linear_bias", 0),
            _local_part(who, weight, "weight"),
            reduction,
            ignore_index,
            label_smoothing,
            chunk_size,
            extras,
            mesh.get_group(),
            vocab_start,
            vocab_size,
        )
        return _replicated(result, mesh)
    group = _resolve_group(who, process_group)
    if group is None or dist.get_world_size(group) == 1:
        from .linear_cross_entropy_loss import _linear_cross_entropy

        if isinstance(local_weight, Tensor) and local_weight.dim() == 2:
            width = local_weight.shape[0]
            sizes = _check_explicit_sizes(who, vocab_start, vocab_size, width)
            if sizes is not None and sizes != (0, width):
                raise ValueError(f"{who}: one rank holds all classes: vocab_start=0, V={width}")
        return _linear_cross_entropy(
            who,
            input,
            local_weight,
            target,
            linear_bias,
            weight,
            reduction,
            ignore_index,
            label_smoothing,
            chunk_size,
            "float32",
            extras["logit_scale"],
            extras["softcap"],
            extras["z_loss"],
            extras["token_weight"],
            extras["return_stats"],
            None,
        )
    return _sharded_linear_cross_entropy(
        who,
        input,
        local_weight,
        target,
        linear_bias,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        chunk_size,
        extras,
        group,
        vocab_start,
        vocab_size,
    )


@torch.compiler.disable
def _sharded_linear_cross_entropy(
    who,
    input,
    local_weight,
    target,
    linear_bias,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    chunk_size,
    extras,
    group,
    vocab_start,
    vocab_size,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """The sharded call of the linear head (run eagerly under ``torch.compile``)."""
    exchange = _exchanges(vocab_start is not None or vocab_size is not None)
    error: Exception | None = None
    meta = t = tw = None
    explicit = None
    try:
        opts = check_options(who, ignore_index, label_smoothing, reduction)
        opts = check_extras(who, opts, extras["logit_scale"], extras["softcap"], extras["z_loss"])
        want_stats = _check_return_stats(who, extras["return_stats"])
        check_chunk_size(who, chunk_size)
        _check_linear(who, input, local_weight, target, linear_bias, weight)
        tw = extras["token_weight"]
        check_token_weight(who, tw, tuple(target.shape), input.device)
        width, D = local_weight.shape
        explicit = _check_explicit_sizes(who, vocab_start, vocab_size, width)
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
            opts_key=_opts_key(opts),
            extras_key=_extras_key(opts, want_stats),
            declared=explicit,
        )
    except (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError) as exc:
        if not exchange:
            raise
        error = exc
    if exchange:
        device = input.device if isinstance(input, Tensor) else torch.device("cpu")
        ii = -100 if ignore_index is None else ignore_index
        ii = ii if isinstance(ii, int) else -100
        sh = _agree(who, group, device, error, meta, t if meta else None, ii, tw, weight)
    else:
        sh = _explicit_shard(who, group, explicit, meta.width, weight)
    w = None if weight is None else weight.detach().to(accumulation_dtype(x.dtype))
    tw = prepare_token_weight(tw, x.dtype)
    step = planned_chunk_rows(x.shape[0], max(sh.width, 1), x.dtype, chunk_size, x.device)
    loss, rows, z_red = _VocabParallelLinearCrossEntropy.apply(
        x, local_weight, linear_bias, t, w, tw, sh, opts, want_stats, step
    )
    loss = loss.reshape(meta.out_shape) if opts.per_row else loss
    if not want_stats:
        return loss
    return loss, _public_stats(rows, z_red, opts.per_row, meta.out_shape)


def wants_vocab_parallel(input: Tensor, process_group: object) -> bool:
    """Whether a call of the plain functions goes here: a process group was given, or the input
    (the logits, or the linear head's weight) is a ``DTensor`` (``torch.distributed.tensor``)."""
    if process_group is not None:
        return True
    if type(input) is Tensor or not isinstance(input, Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(input, DTensor)


# Options of the plain functions with no sharded meaning: the sharded loss refuses them.
_UNSHARDED_DEFAULTS = {
    "inplace_backward": False,
    "accumulation": "float32",
}


def refuse_unsharded_options(who: str, **options: object) -> None:
    """Raises NotImplementedError naming the options, among those of ``_UNSHARDED_DEFAULTS``,
    that are not at their defaults: ``inplace_backward`` (the slices' gradient is written per
    chunk from the saved logits, which backward still reads) and ``accumulation="input"`` (the
    local weight gradient is accumulated in float32)."""
    asked = [name for name, value in options.items() if value != _UNSHARDED_DEFAULTS[name]]
    if asked:
        raise NotImplementedError(
            f"{who}: {', '.join(asked)} not supported with a process_group or a DTensor input; "
            "the vocabulary-parallel loss takes every other option (weight, ignore_index, "
            "reduction, label_smoothing, logit_scale, softcap, z_loss, token_weight, "
            "return_stats; chunk_size and linear_bias for the linear head)"
        )
