"""The checks of one rank's arguments to the sharded losses, before the rank agreement.

Each rank checks its own tensors with the plain calls' checkers (``validation.py``, on a slice)
and flattens the cross-entropy's logits to (M, V_r); an error raised here
travels to every rank through the metadata exchange (``agreement.agree``). ``CE_WHO`` / ``LCE_WHO``
are the names of the vocabulary-parallel entry points, which the messages use to name the
arguments as those functions call them.
"""

from __future__ import annotations

from torch import Tensor

from ..options import index_target_for_kernels
from ..validation import check_cross_entropy_args, check_linear_args, logits_rows, loss_shape
from .agreement import Shard
from .slices import KEY_CLASS_BITS

CE_WHO = "vocab_parallel_cross_entropy"
LCE_WHO = "vocab_parallel_linear_cross_entropy"


def flatten_ce(
    who: str, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, tuple[int, ...], bool]:
    """Checks one rank's tensors; returns (logits (M, V_r), target (M,) or (M, V_r), output
    shape, whether the targets are probabilities)."""
    name = "local_logits" if who == CE_WHO else "input"  # the argument's name in ``who``
    soft = check_cross_entropy_args(who, input, target, weight, ignore_index, name, True)
    if not soft:
        target = index_target_for_kernels(target, ignore_index)
    logits, target = logits_rows(input, target, soft)
    return logits, target, loss_shape(input), soft


def check_return_stats(who: str, return_stats: object) -> bool:
    """``return_stats`` if it is a bool; else a TypeError naming ``who``."""
    if not isinstance(return_stats, bool):
        raise TypeError(f"{who}: return_stats must be a bool, got {type(return_stats).__name__}")
    return return_stats


def check_soft_stats_vocab(who: str, sh: Shard, soft: bool, want_stats: bool) -> None:
    """Refuses statistics with probability targets over more than 2**30 classes (the argmax
    key's class bits): the same verdict on every rank, the vocabulary being global."""
    if soft and want_stats and sh.vocab > 2**KEY_CLASS_BITS:
        raise NotImplementedError(
            f"{who}: return_stats with probability targets needs V <= 2**30 classes, got {sh.vocab}"
        )


def check_linear_shard(
    who: str,
    input: object,
    W: object,
    target: object,
    b: object,
    weight: object,
) -> None:
    """Checks one rank's tensors of the fused head (``W``, ``b``: this rank's rows)."""
    name = "local_weight" if who == LCE_WHO else "linear_weight"  # the argument's name in ``who``
    check_linear_args(who, input, W, target, b, weight, name, sharded=True)
