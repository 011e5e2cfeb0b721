"""DTensor arguments of the sharded losses: unwrapping them into this rank's local tensors and
the group of their mesh, and wrapping the results as replicated DTensors.

A ``DTensor`` input (the logits sharded on the class dimension, or the linear head's weight
sharded by rows) on a 1-D mesh reduces over the mesh's group; the other tensor arguments may be
DTensors too (replicated; the probability target and the bias sharded like the input), and the
loss (and the statistics) come back replicated, as under ``loss_parallel()``.
``torch.distributed.tensor`` is imported where it is used: torch builds without
``torch.distributed`` have none.
"""

from __future__ import annotations

from torch import Tensor

from ..core import CrossEntropyStats
from .arguments import _LCE


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False in torch builds without
    ``torch.distributed``)."""
    if type(t) is Tensor or not isinstance(t, Tensor):
        return False
    try:
        # Optional: torch.distributed.tensor exists only in torch builds with distributed.
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _local_part(who: str, t: object, name: str, shard_dim: int | None = None) -> object:
    """A DTensor argument's local tensor: replicated ones (or sharded on ``shard_dim``)."""
    # Optional: torch.distributed.tensor exists only in torch builds with distributed.
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


def replicated(result: object, mesh: object) -> object:
    """The loss (and the stats) of a DTensor call as replicated DTensors of ``mesh``."""
    # Optional: torch.distributed.tensor exists only in torch builds with distributed.
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


def cross_entropy_parts(
    who: str,
    input: Tensor,
    target: object,
    weight: object,
    token_weight: object,
    process_group: object,
) -> tuple[object, Tensor, object, object, object]:
    """A DTensor ``input`` sharded on the class dimension of a 1-D mesh: (the mesh, the local
    logits, target, class weights and token weights) of this rank, for a call on the mesh's
    group."""
    mesh = _mesh_of(who, input, process_group)
    class_dim = 1 if input.dim() >= 2 else 0
    (place,) = input.placements
    if not place.is_shard() or place.dim % input.dim() != class_dim:
        raise ValueError(
            f"{who}: a DTensor input must be sharded on the class dimension (Shard({class_dim})"
            f"), got {input.placements}"
        )
    token_weight = _local_part(who, token_weight, "token_weight")
    return (
        mesh,
        input.to_local(),
        _local_part(who, target, "target", class_dim),
        _local_part(who, weight, "weight"),
        token_weight,
    )


def linear_parts(
    who: str,
    input: object,
    local_weight: Tensor,
    target: object,
    linear_bias: object,
    weight: object,
    token_weight: object,
    process_group: object,
) -> tuple[object, object, Tensor, object, object, object, object]:
    """A DTensor linear weight (V, D) sharded by rows on a 1-D mesh: (the mesh, the local input,
    weight rows, target, bias, class weights and token weights) of this rank, for a call on the
    mesh's group."""
    name = "local_weight" if who == _LCE else "linear_weight"
    mesh = _mesh_of(who, local_weight, process_group)
    if not all(p.is_shard() and p.dim % 2 == 0 for p in local_weight.placements):
        raise ValueError(
            f"{who}: a DTensor {name} must be sharded by rows (Shard(0)), got "
            f"{local_weight.placements}"
        )
    token_weight = _local_part(who, token_weight, "token_weight")
    return (
        mesh,
        _local_part(who, input, "input"),
        local_weight.to_local(),
        _local_part(who, target, "target"),
        _local_part(who, linear_bias, "linear_bias", 0),
        _local_part(who, weight, "weight"),
        token_weight,
    )
