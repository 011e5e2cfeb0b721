"""The output layer split by vocabulary rows over a tensor-parallel group (`Classifier`'s
``vocab_parallel=True`` under Lightning's ``ModelParallelStrategy``).

Rank r of the group holds the rows ``[start_r, start_r + V_r)`` of the ``(V, H)`` head weight
and of its bias (``torch.chunk`` sizes: ``ceil(V / R)`` per rank, the last ranks fewer), as
DTensors sharded on dimension 0. The hidden layers are replicated: every rank holds them whole
and computes the same features. The loss comes from ``fusedce.linear_cross_entropy`` (fused
head) or ``fusedce.cross_entropy`` (local ``(B, V_r)`` logits) with ``process_group=``, the
z-loss, softcap and logit scale included; the statistics (z-loss, lse, entropy, top-1) come
from the same call (``return_stats=True``, within its two forward all-reduces). Nothing of
size V is ever sent between ranks. This module holds the rest: the split of the head and the
gradient norm and clipping over sharded and replicated gradients together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn


class HeadShard(NamedTuple):
    """This rank's part of the sharded output layer.

    Attributes:
        group: The tensor-parallel process group.
        rank: This rank in ``group``.
        world: Size of ``group``.
        start: First global class held here.
        width: Number of classes held here, ``V_r``.
        vocab: Global number of classes ``V``.
    """

    group: object
    rank: int
    world: int
    start: int
    width: int
    vocab: int


def chunk_bounds(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, width)`` of rank ``rank``'s rows under ``torch.chunk`` / DTensor ``Shard(0)``
    of ``vocab`` rows over ``world`` ranks."""
    step = math.ceil(vocab / world)
    start = min(rank * step, vocab)
    return start, min(step, vocab - start)


def shard_head(head: nn.Linear, mesh: object) -> HeadShard:
    """Splits ``head`` by output rows over the 1-D device ``mesh`` (``ColwiseParallel``).

    The head's full weight must already be identical on every rank (same seed): each rank keeps
    its rows. Afterwards ``head.weight`` ``(V_r, H)`` and ``head.bias`` ``(V_r,)`` are DTensors
    sharded on dimension 0, and ``head(h)`` maps replicated ``(B, H)`` features to this rank's
    ``(B, V_r)`` logits (a plain tensor; backward all-reduces the features' gradient).

    Args:
        head: The output ``Linear(H, V)``.
        mesh: A 1-D ``DeviceMesh`` (the tensor-parallel dimension).

    Returns:
        This rank's `HeadShard`.

    Raises:
        ValueError: If the mesh is not 1-D, or a rank would hold no class (more ranks than
            classes, or chunk sizes that leave the last ranks none); raised on every rank.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    if mesh.ndim != 1:
        raise ValueError(f"vocab_parallel: the tensor-parallel mesh must be 1-D, got {mesh.ndim}-D")
    vocab, world = head.out_features, mesh.size()
    if world > vocab:
        raise ValueError(
            f"vocab_parallel: {world} tensor-parallel ranks for {vocab} classes; every rank "
            "must hold at least one class (use at most num_classes ranks)"
        )
    # Every rank checks the last (smallest) chunk, so that all raise together: e.g. 8 classes
    # over 5 ranks are chunks of 2 and leave the fifth rank none.
    if chunk_bounds(vocab, world, world - 1)[1] < 1:
        raise ValueError(
            f"vocab_parallel: {vocab} classes over {world} ranks in chunks of "
            f"{math.ceil(vocab / world)} leave rank {world - 1} without classes"
        )
    start, width = chunk_bounds(vocab, world, mesh.get_local_rank())
    parallelize_module(head, mesh, ColwiseParallel())
    local = head.weight.to_local()
    if local.shape[0] != width:  # torch's split rule changed: fail loudly, not silently wrong
        raise RuntimeError(
            f"vocab_parallel: expected {width} local rows, DTensor holds {local.shape}"
        )
    return HeadShard(mesh.get_group(), mesh.get_local_rank(), world, start, width, vocab)


def _grads(params: Iterable[nn.Parameter]) -> tuple[list[Tensor], list[Tensor]]:
    """``(sharded, replicated)`` local gradients: DTensor gradients as their local shards."""
    from torch.distributed.tensor import DTensor

    sharded, replicated = [], []
    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            sharded.append(p.grad.to_local())
        else:
            replicated.append(p.grad)
    return sharded, replicated


@torch.no_grad()
def grad_total_norm(params: Iterable[nn.Parameter], shard: HeadShard) -> Tensor:
    """The 2-norm of all gradients as one vector, the sharded ones counted once over the ranks
    (one all-reduce of a scalar); the same value on every rank.

    Args:
        params: The model's parameters: DTensor ones (sharded head) and plain ones (replicated).
        shard: This rank's `HeadShard`.

    Returns:
        A 0-dim float32 tensor.
    """
    sharded, replicated = _grads(params)
    device = (sharded + replicated)[0].device if sharded or replicated else torch.device("cpu")
    sq_sharded = sum((g.float().square().sum() for g in sharded), torch.zeros((), device=device))
    dist.all_reduce(sq_sharded, op=dist.ReduceOp.SUM, group=shard.group)
    sq = sum((g.float().square().sum() for g in replicated), sq_sharded)
    return sq.sqrt()


@torch.no_grad()
def clip_gradients(
    params: Iterable[nn.Parameter], shard: HeadShard, clip_val: float, algorithm: str
) -> None:
    """``torch.nn.utils.clip_grad_norm_`` (``algorithm="norm"``, the norm of `grad_total_norm`)
    or ``clip_grad_value_`` (``"value"``) over sharded and replicated gradients alike."""
    params = list(params)
    sharded, replicated = _grads(params)
    if algorithm == "value":
        for g in sharded + replicated:
            g.clamp_(-clip_val, clip_val)
        return
    total = grad_total_norm(params, shard)
    coef = (clip_val / (total + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
    for g in sharded + replicated:
        g.mul_(coef.to(g.dtype))


def split_params(module: nn.Module) -> list[dict[str, list[nn.Parameter]]]:
    """Two optimizer parameter groups: plain parameters, then DTensor ones (the sharded head);
    foreach optimizer kernels take either kind but not both in one call."""
    from torch.distributed.tensor import DTensor

    plain = [p for p in module.parameters() if not isinstance(p, DTensor)]
    sharded = [p for p in module.parameters() if isinstance(p, DTensor)]
    return [g for g in ({"params": plain}, {"params": sharded}) if g["params"]]
