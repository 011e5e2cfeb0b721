"""The calls of the sharded losses: from the arguments to the autograd Function.

``call_sharded`` (with ``CE`` or ``LCE``: which loss) takes a call of the plain functions with
a process group or a DTensor (``wants_vocab_parallel``), or of the vocabulary-parallel entry
points: a DTensor is unwrapped (``dtensor``) and its result rewrapped; a group of one rank (or
no group at all) runs ``plain``, the unsharded implementation that the caller passes in;
otherwise the sharded call checks this rank's arguments (``arguments``), agrees with the other
ranks (``agreement``) and runs the autograd Function (``functions``). This package never imports
the public-function modules: they import it, and hand it their implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..core import CrossEntropyStats
from ..linear_chunks import planned_chunk_rows
from ..options import (
    CallOptions,
    LossOptions,
    accumulation_dtype,
    check_chunk_size,
    index_target_for_kernels,
    prepare_token_weight,
)
from ..validation import check_token_weight
from . import dtensor
from .agreement import (
    Shard,
    ShardMeta,
    agree,
    check_explicit_sizes,
    exchanges,
    explicit_shard,
    extras_key,
    opts_key,
    resolve_group,
)
from .arguments import (
    check_linear_shard,
    check_return_stats,
    check_soft_stats_vocab,
    flatten_ce,
)
from .functions import VocabParallelCrossEntropy, VocabParallelLinearCrossEntropy

Result = Tensor | tuple[Tensor, CrossEntropyStats]
# The unsharded implementation a group of one rank runs, ``(who, tensors, call)``:
# ``cross_entropy_loss.named_cross_entropy`` /
# ``linear_cross_entropy_loss.named_linear_cross_entropy``.
PlainLoss = Callable[..., Result]


def wants_vocab_parallel(input: Tensor, process_group: object) -> bool:
    """Whether a call of the plain functions goes here: a process group was given, or the input
    (the logits, or the linear head's weight) is a ``DTensor`` (``torch.distributed.tensor``)."""
    return process_group is not None or dtensor.is_dtensor(input)


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


def _public_stats(extras: Tensor, z_red: Tensor, per_row: bool, shape: tuple[int, ...]):
    """``CrossEntropyStats`` from the (4, M) rows (z-loss part, lse, entropy, correct)."""
    return CrossEntropyStats(
        extras[0].reshape(shape) if per_row else z_red,
        extras[1].reshape(shape),
        extras[2].reshape(shape),
        (extras[3] != 0).reshape(shape),
    )


def shard_meta(
    opts: LossOptions,
    want_stats: bool,
    weight: Tensor | None,
    explicit: tuple[int, int] | None,
    shape: tuple[int, int, int],
    out_shape: tuple[int, ...],
    soft: bool,
    dtype: torch.dtype,
) -> ShardMeta:
    """This rank's metadata for the agreement; ``shape``: (rows, width, features)."""
    rows, width, features = shape
    return ShardMeta(
        width=width,
        rows=rows,
        out_shape=out_shape,
        soft=soft,
        features=features,
        dtype=dtype,
        weight_numel=-1 if weight is None else weight.numel(),
        opts_key=opts_key(opts),
        extras_key=extras_key(opts, want_stats),
        declared=explicit,
    )


# What one rank's checks may raise: caught, and raised on every rank by the exchange.
_LOCAL_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)


class _Local(NamedTuple):
    """One rank's checked call: what the agreement compares, and what its Function takes."""

    opts: LossOptions
    want_stats: bool
    meta: ShardMeta
    target: Tensor  # (M,) class indices, or this slice's (M, V_r) probabilities
    rows: Tensor  # the logits (M, V_r), or the fused head's input (N, D)
    explicit: tuple[int, int] | None  # the checked vocab_start / vocab_size, if given


def _agreed_shard(
    who: str,
    group: object,
    call: CallOptions,
    input: object,
    weight: Tensor | None,
    tw: Tensor | None,
    sizes: tuple[object, object],
    check: Callable[[], _Local],
) -> tuple[Shard, _Local, Tensor | None, Tensor | None]:
    """Runs this rank's ``check``, then agrees on the shard: in the exchange, which raises the
    check's error (or any rank's) on every rank and compares the targets with ignore_index
    (-100 for a bad or None value: its error comes from the check); or, without an exchange,
    from the explicit sizes (``vocab_start``, ``vocab_size``; a check's error then raises here).
    ``input`` gives the device. Returns the shard, the checked call, and the class and token
    weights as the Functions read them."""
    exchange = exchanges(any(size is not None for size in sizes))
    error: Exception | None = None
    local = None
    try:
        local = check()
    except _LOCAL_ERRORS as exc:
        if not exchange:
            raise
        error = exc
    if exchange:  # raises any rank's error on every rank
        device = input.device if isinstance(input, Tensor) else torch.device("cpu")
        ii = call.ignore_index if isinstance(call.ignore_index, int) else -100
        meta, t = (local.meta, local.target) if local is not None else (None, None)
        shard = agree(who, group, device, error, meta, t, ii, tw, weight)
    else:
        shard = explicit_shard(who, group, local.explicit, local.meta.width, weight)
    dtype = local.rows.dtype
    w = None if weight is None else weight.detach().to(accumulation_dtype(dtype))
    return shard, local, w, prepare_token_weight(tw, dtype)


def _result(
    loss: Tensor,
    rows: Tensor,
    z_red: Tensor,
    opts: LossOptions,
    want_stats: bool,
    out_shape: tuple[int, ...],
) -> Result:
    """The loss (and the stats) in the call's output shape."""
    loss = loss.reshape(out_shape) if opts.per_row else loss
    if not want_stats:
        return loss
    return loss, _public_stats(rows, z_red, opts.per_row, out_shape)


def _check_one_rank_sizes(who: str, vocab_start: object, vocab_size: object, width: int) -> None:
    """A group of one rank holds all ``width`` classes: ``vocab_start`` / ``vocab_size``, where
    given, must say so."""
    sizes = check_explicit_sizes(who, vocab_start, vocab_size, width)
    if sizes is not None and sizes != (0, width):
        raise ValueError(f"{who}: one rank holds all classes: vocab_start=0, V={width}")


def call_sharded(
    loss: ShardedLoss,
    who: str,
    tensors: tuple,
    call: CallOptions,
    process_group: object,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    *,
    plain: PlainLoss,
) -> Result:
    """A vocabulary-parallel call (``CE``: ``vocab_parallel_cross_entropy``, ``LCE``:
    ``vocab_parallel_linear_cross_entropy``) through the public function ``who`` (which the
    errors name); ``tensors``: the call's tensors in the order of ``plain``'s tuple (see ``CE``
    and ``LCE``); ``call``: the keyword options as passed; ``plain``: the unsharded
    implementation (``named_cross_entropy`` / ``named_linear_cross_entropy`` of the public-function
    modules), which a group of one rank runs."""
    sizes = (vocab_start, vocab_size)
    split = tensors[loss.split_at]
    if dtensor.is_dtensor(split):
        # A DTensor split over the vocabulary: the local parts on the mesh's group.
        mesh, *local = loss.dtensor_parts(who, *tensors, process_group)
        result = call_sharded(loss, who, tuple(local), call, mesh.get_group(), *sizes, plain=plain)
        return dtensor.replicated(result, mesh)
    group = resolve_group(who, process_group)
    if group is None or dist.get_world_size(group) == 1:
        width = loss.width(split)
        if width is not None:
            _check_one_rank_sizes(who, vocab_start, vocab_size, width)
        return plain(who, tensors, call)
    return loss.sharded(who, *tensors, call, group, *sizes)


def _eager_under_compile(fn: Callable[..., Result]) -> Callable[..., Result]:
    """``torch.compiler.disable(fn)``, made at the first call: the decorator imports
    ``torch._dynamo``, about 1 s that ``import fusedce`` would otherwise spend before anything
    is compiled (a call under ``torch.compile`` still breaks the graph there and runs ``fn``
    eagerly)."""
    disabled: Callable[..., Result] | None = None

    @functools.wraps(fn)
    def call(*args: object) -> Result:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args)

    return call


@_eager_under_compile
def _sharded_cross_entropy(
    who, local_logits, target, weight, tw, call, group, vocab_start, vocab_size
) -> Result:
    """The sharded call. Run eagerly under ``torch.compile`` (a graph break): the metadata
    exchange reads values back to the host and the autograd Function holds collectives."""

    def check() -> _Local:
        opts = call.loss_options(who)
        want_stats = check_return_stats(who, call.return_stats)
        logits, t, out_shape, soft = flatten_ce(
            who, local_logits, target, weight, opts.ignore_index
        )
        check_token_weight(who, tw, out_shape, logits.device)
        explicit = check_explicit_sizes(who, vocab_start, vocab_size, logits.shape[1])
        shape = (logits.shape[0], logits.shape[1], 0)
        meta = shard_meta(opts, want_stats, weight, explicit, shape, out_shape, soft, logits.dtype)
        return _Local(opts, want_stats, meta, t, logits, explicit)

    sizes = (vocab_start, vocab_size)
    sh, local, w, tw = _agreed_shard(who, group, call, local_logits, weight, tw, sizes, check)
    opts, want_stats, meta, t, logits, _ = local
    check_soft_stats_vocab(who, sh, meta.soft, want_stats)
    loss, rows, z_red = VocabParallelCrossEntropy.apply(logits, t, w, tw, sh, opts, want_stats)
    return _result(loss, rows, z_red, opts, want_stats, meta.out_shape)


@_eager_under_compile
def _sharded_linear_cross_entropy(
    who, input, local_weight, target, linear_bias, weight, tw, call, group, vocab_start, vocab_size
) -> Result:
    """The sharded call of the linear head (run eagerly under ``torch.compile``)."""

    def check() -> _Local:
        opts = call.loss_options(who)
        want_stats = check_return_stats(who, call.return_stats)
        check_chunk_size(who, call.chunk_size)
        check_linear_shard(who, input, local_weight, target, linear_bias, weight)
        check_token_weight(who, tw, tuple(target.shape), input.device)
        width, D = local_weight.shape
        explicit = check_explicit_sizes(who, vocab_start, vocab_size, width)
        x = input.reshape(-1, D)
        t = index_target_for_kernels(target.reshape(-1), opts.ignore_index)
        out_shape = tuple(target.shape)
        shape = (x.shape[0], width, D)
        meta = shard_meta(opts, want_stats, weight, explicit, shape, out_shape, False, x.dtype)
        return _Local(opts, want_stats, meta, t, x, explicit)

    sizes = (vocab_start, vocab_size)
    sh, local, w, tw = _agreed_shard(who, group, call, input, weight, tw, sizes, check)
    opts, want_stats, meta, t, x, _ = local
    step = planned_chunk_rows(x.shape[0], max(sh.width, 1), x.dtype, call.chunk_size, x.device)
    loss, rows, z_red = VocabParallelLinearCrossEntropy.apply(
        x, local_weight, linear_bias, t, w, tw, sh, opts, want_stats, step
    )
    return _result(loss, rows, z_red, opts, want_stats, meta.out_shape)


def _logits_width(local_logits: object) -> int | None:
    """The classes of one rank's logits, where they are a tensor with a class dimension."""
    if isinstance(local_logits, Tensor) and local_logits.dim() > 0:
        return local_logits.shape[0 if local_logits.dim() == 1 else 1]
    return None


def _weight_rows(local_weight: object) -> int | None:
    """The classes of one rank's weight rows, where they are a (V_r, D) tensor."""
    if isinstance(local_weight, Tensor) and local_weight.dim() == 2:
        return local_weight.shape[0]
    return None


class ShardedLoss(NamedTuple):
    """What ``call_sharded`` needs of one loss: where its vocabulary-split tensor sits among
    the tensors, how to read its width and DTensor parts, and its sharded call."""

    split_at: int  # the index of the split tensor (the logits, or the head's weight)
    width: Callable[[object], int | None]
    dtensor_parts: Callable[..., tuple]
    sharded: Callable[..., Result]


# (local_logits, target, weight, token_weight)
CE = ShardedLoss(0, _logits_width, dtensor.cross_entropy_parts, _sharded_cross_entropy)
# (input, local_weight, target, linear_bias, weight, token_weight)
LCE = ShardedLoss(1, _weight_rows, dtensor.linear_parts, _sharded_linear_cross_entropy)
