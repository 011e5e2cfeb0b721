"""Rank agreement of the sharded losses: the group, this rank's slice, and the metadata exchange.

``agree`` runs ONE ``all_gather`` of a row of int64 per rank (the named columns of ``_FIELDS``,
by name through ``_Col``): the slice width, the shapes, the options, fingerprints of the class
indices and of the token and class weights, and ``vocab_start`` / ``vocab_size`` where given.
Every rank reads the same table and reaches the same verdict, so a bad or mismatched argument
makes EVERY rank raise the same exception (a rank that failed its own checks sends an error code
instead of its row). The result is ``Shard``: this rank's place in the vocabulary. Also the
process-group checks (before any collective) and the trusted slice of ``vocab_start`` /
``vocab_size`` with the checks off (``explicit_shard``: no exchange).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import index_check
from ..options import REDUCTIONS, LossOptions

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


class Shard(NamedTuple):
    """This rank's place in the vocabulary."""

    group: object  # the process group
    start: int  # first global class of the slice
    width: int  # V_r
    vocab: int  # V, the global number of classes


def resolve_group(who: str, process_group: object) -> object | None:
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


def check_explicit_sizes(
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


def exchanges(sizes_given: bool) -> bool:
    """Whether the call runs the metadata exchange: always with the sizes learnt; with
    ``vocab_start`` / ``vocab_size`` given only while the checks are on (``set_target_check``),
    and then it checks them against the gathered widths."""
    return not sizes_given or index_check.target_check_enabled()


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _shape_key(shape: tuple[int, ...]) -> int:
    # hash() of a tuple of ints is the same in every process (no string hashing involved).
    return hash(shape) & _INT64_MAX


class ShardMeta(NamedTuple):
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


def agree(
    who: str,
    group: object,
    device: torch.device,
    error: Exception | None,
    meta: ShardMeta | None,
    target: Tensor | None,
    ignore_index: int,
    token_weight: Tensor | None = None,
    weight: Tensor | None = None,
) -> Shard:
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
    return Shard(group, sum(widths[:rank]), widths[rank], vocab)


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


def explicit_shard(
    who: str, group: object, sizes: tuple[int, int], width: int, weight: Tensor | None
) -> Shard:
    """The slice as the caller gave it, with the checks off (``set_target_check(False)``): no
    exchange, so only this rank's own checks."""
    start, vocab = sizes
    if weight is not None and weight.numel() != vocab:
        raise ValueError(
            f"{who}: weight must be a 1-D tensor of all {vocab} class weights, got "
            f"{weight.numel()} elements"
        )
    return Shard(group, start, width, vocab)


def opts_key(opts: LossOptions) -> tuple[int, int, int]:
    """The loss options every rank must agree on, as integers for the metadata exchange."""
    return REDUCTIONS.index(opts.reduction), opts.ignore_index, _float_bits(opts.label_smoothing)


def extras_key(opts: LossOptions, return_stats: bool) -> tuple[int, int, int, int]:
    """The logit transforms, the z-loss and ``return_stats`` every rank must agree on, as
    integers for the metadata exchange (floats by their bits)."""
    cap = -1 if opts.softcap is None else _float_bits(opts.softcap)
    return (_float_bits(opts.logit_scale), cap, _float_bits(opts.z_loss), int(return_stats))
