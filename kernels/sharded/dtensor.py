"""DTensor arguments of the sharded losses: unwrapping them into this rank's local tensors and
the group of their mesh, and wrapping the results as replicated DTensors.

A ``DTensor`` input (the logits sharded on the class dimension, or the linear head's weight
sharded by rows) on a 1-D mesh reduces over the mesh's group; the other tensor arguments may be
DTensors too (replicated; the probability target and the bias sharded like the input), and the
loss (and the statistics) come back replicated, as under ``loss_parallel()``. The
distillation losses (``distillation_parts``, ``linear_distillation_parts``) take a dense
teacher's logits (its head's weight) as a DTensor split like the student's.
``torch.distributed.tensor`` is imported where it is used: torch builds without
``torch.distributed`` have none.
"""

from __future__ import annotations

from torch import Tensor

from ..core import CrossEntropyStats
from .arguments import LCE_WHO


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


def local_part(who: str, t: object, name: str, shard_dim: int | None = None) -> object:
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
    token_weight = local_part(who, token_weight, "token_weight")
    return (
        mesh,
        input.to_local(),
        local_part(who, target, "target", class_dim),
        local_part(who, weight, "weight"),
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
    name = "local_weight" if who == LCE_WHO else "linear_weight"
    mesh = _mesh_of(who, local_weight, process_group)
    if not all(p.is_shard() and p.dim % 2 == 0 for p in local_weight.placements):
        raise ValueError(
            f"{who}: a DTensor {name} must be sharded by rows (Shard(0)), got "
            f"{local_weight.placements}"
        )
    token_weight = local_part(who, token_weight, "token_weight")
    return (
        mesh,
        local_part(who, input, "input"),
        local_weight.to_local(),
        local_part(who, target, "target"),
        local_part(who, linear_bias, "linear_bias", 0),
        local_part(who, weight, "weight"),
        token_weight,
    )


def _split_like(who: str, t: object, name: str, dim: int) -> Tensor:
    """The local part of a DTensor ``t`` split on ``dim`` like the call's sharded argument (a
    plain or replicated one would be read as another tensor than this rank's slice)."""
    if not is_dtensor(t) or not all(p.is_shard() and p.dim % t.dim() == dim for p in t.placements):
        got = t.placements if is_dtensor(t) else "a plain tensor"
        raise ValueError(f"{who}: a DTensor {name} must be sharded as Shard({dim}), got {got}")
    return t.to_local()


def logits_parts(who: str, logits: Tensor, process_group: object) -> tuple[object, Tensor]:
    """(the 1-D mesh, this rank's local logits) of a DTensor (..., V) ``logits`` sharded on the
    class (last) dimension."""
    mesh = _mesh_of(who, logits, process_group)
    last = logits.dim() - 1
    if last < 0 or not all(
        p.is_shard() and p.dim % logits.dim() == last for p in logits.placements
    ):
        raise ValueError(
            f"{who}: a DTensor logits must be sharded on the class dimension (Shard(-1)), got "
            f"{logits.placements}"
        )
    return mesh, logits.to_local()


def distillation_parts(
    who: str, logits: Tensor, teacher: dict[str, object], process_group: object
) -> tuple[object, dict[str, object]]:
    """A DTensor (..., V) ``logits`` sharded on the class (last) dimension of a 1-D mesh: (the
    mesh, this rank's local ``logits`` and ``teacher`` tensors) for a call on the mesh's group.
    ``teacher`` maps the keywords ``teacher_logits`` (a DTensor split like the logits),
    ``teacher_ids``, ``teacher_log_probs`` and ``target`` (plain or replicated) to tensors or
    None."""
    mesh, x = logits_parts(who, logits, process_group)
    last = logits.dim() - 1
    local = {k: local_part(who, t, k) for k, t in teacher.items() if k != "teacher_logits"}
    if teacher.get("teacher_logits") is not None:
        # Not local_part: replicated teacher logits would pass there as the wrong width.
        local["teacher_logits"] = _split_like(
            who, teacher["teacher_logits"], "teacher_logits", last
        )
    return mesh, {"logits": x, **local}


def linear_distillation_parts(
    who: str, input: object, linear_weight: Tensor, more: dict[str, object], process_group: object
) -> tuple[object, dict[str, object]]:
    """A DTensor (V, D) ``linear_weight`` sharded by rows on a 1-D mesh: (the mesh, this rank's
    local ``input``, ``linear_weight`` and ``more`` tensors) for a call on the mesh's group.
    ``more`` maps the keywords ``linear_bias`` and ``teacher_bias`` (split like the weight, or
    replicated), ``teacher_weight`` (a DTensor split like the weight), ``teacher_input``,
    ``teacher_ids``, ``teacher_log_probs`` and ``target`` (plain or replicated) to tensors or
    None."""
    mesh, x, W, *_ = linear_parts(who, input, linear_weight, None, None, None, None, process_group)
    local = {
        k: local_part(who, t, k, 0 if k.endswith("bias") else None)
        for k, t in more.items()
        if k != "teacher_weight"
    }
    if more.get("teacher_weight") is not None:
        # Not local_part: a replicated teacher head would pass there as the wrong rows.
        local["teacher_weight"] = _split_like(who, more["teacher_weight"], "teacher_weight", 0)
    return mesh, {"input": x, "linear_weight": W, **local}
