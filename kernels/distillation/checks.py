"""The argument checks of the distillation losses: one teacher form, the teacher's and the
target's tensors against the student's, and the heads of ``linear_distillation_loss``.

Every message starts with the public function's name (``who``) and names the argument as that
function calls it. The values (ids in range, sparse mass, class indices) are checked later, on
the device (``value_checks``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..options import INDEX_DTYPES
from ..validation import check_tensors
from .options import DistillOptions
from .teacher import Teacher


def wants_group(who: str, process_group: object) -> bool:
    """Whether a call runs vocabulary-parallel: a ``ProcessGroup`` of more than one rank (None,
    as ``torch.distributed.group.WORLD`` before ``init_process_group``, and a group of one rank
    run the plain function)."""
    if process_group is None:
        return False
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{who}: process_group is given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{who}: process_group must be a torch.distributed.ProcessGroup, got "
            f"{type(process_group).__name__}"
        )
    return dist.get_world_size(process_group) > 1


def refuse_grad(who: str, name: str, t: Tensor | None) -> None:
    """The teacher's tensor ``name`` needs no gradient (the teacher is not differentiated)."""
    if t is not None and t.requires_grad:
        raise ValueError(
            f"{who}: {name} requires grad; the teacher is not differentiated (gradients reach "
            f"the student only): pass {name}.detach()"
        )


def check_teacher_form(
    who: str,
    dense: Tensor | None,
    ids: Tensor | None,
    log_probs: Tensor | None,
    dense_name: str = "teacher_logits",
) -> None:
    """Exactly one teacher form: ``dense_name`` or (``teacher_ids`` and ``teacher_log_probs``)."""
    sparse = ids is not None or log_probs is not None
    if dense is None and not sparse:
        raise ValueError(
            f"{who}: pass the teacher: {dense_name}, or teacher_ids with teacher_log_probs"
        )
    if dense is not None and sparse:
        raise ValueError(
            f"{who}: pass one teacher form: {dense_name}, or teacher_ids with "
            "teacher_log_probs, not both"
        )
    if sparse and (ids is None or log_probs is None):
        raise ValueError(f"{who}: teacher_ids and teacher_log_probs go together; pass both")


def _check_on(who: str, name: str, t: Tensor, device: torch.device) -> None:
    """``t`` (the argument ``name``) is a tensor on the logits' ``device``."""
    check_tensors(who, **{name: t})
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device}, the logits on {device}")


def _check_sparse(
    who: str, lead: tuple[int, ...], device: torch.device, ids: Tensor, log_probs: Tensor
) -> tuple[Tensor, Tensor]:
    """The sparse teacher (..., k) against the leading shape ``lead``; returns ids (M, k) int64
    and log_probs (M, k), contiguous."""
    _check_on(who, "teacher_ids", ids, device)
    _check_on(who, "teacher_log_probs", log_probs, device)
    if ids.dtype != torch.int64:
        raise TypeError(f"{who}: teacher_ids must be int64, got {ids.dtype}")
    if not log_probs.is_floating_point():
        raise TypeError(f"{who}: teacher_log_probs must be floating, got {log_probs.dtype}")
    refuse_grad(who, "teacher_log_probs", log_probs)
    if ids.shape != log_probs.shape:
        raise ValueError(
            f"{who}: teacher_ids {tuple(ids.shape)} and teacher_log_probs "
            f"{tuple(log_probs.shape)} must have the same shape"
        )
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead:
        raise ValueError(
            f"{who}: teacher_ids must have shape {(*lead, 'k')} for logits of leading "
            f"shape {lead}, got {tuple(ids.shape)}"
        )
    k = ids.shape[-1]
    if k == 0:
        raise ValueError(f"{who}: teacher_ids has no column (k = 0); k must be >= 1")
    return ids.reshape(-1, k).contiguous(), log_probs.reshape(-1, k).contiguous()


def check_sparse_and_target(
    who: str,
    lead: tuple[int, ...],
    device: torch.device,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
) -> tuple[Teacher, Tensor | None]:
    """Checks the sparse teacher (if any) and the target against the leading shape ``lead``;
    returns them as rows: the teacher with ids (M, k) int64 and log_probs (M, k), and target
    (M,) int64, contiguous."""
    if teacher.ids is not None:
        teacher = Teacher(teacher.logits, *_check_sparse(who, lead, device, *teacher[1:]))
    if target is not None:
        _check_on(who, "target", target, device)
        if target.dtype not in INDEX_DTYPES:
            raise TypeError(
                f"{who}: target holds class indices: int64, int32 or uint8, got {target.dtype}"
            )
        if tuple(target.shape) != lead:
            raise ValueError(
                f"{who}: target must have the logits' leading shape {lead}, got "
                f"{tuple(target.shape)}"
            )
        target = target.reshape(-1).long().contiguous()
    elif opts.hard_weight > 0.0:
        raise ValueError(f"{who}: hard_weight > 0 mixes in the cross-entropy: pass target")
    return teacher, target


def as_rows(t: Tensor, V: int) -> Tensor:
    """(M, V) with unit stride along V (a copy only where the input lacks it)."""
    t = t.reshape(math.prod(t.shape[:-1]), V)  # not -1: V may be 0 on a vocabulary slice
    return t if t.stride(-1) == 1 else t.contiguous()


# What dense teacher logits share with the logits: (attribute, error, message).
_LIKE_LOGITS = (
    ("shape", ValueError, "teacher_logits {t} must have the logits' shape {x}"),
    ("dtype", TypeError, "teacher_logits is {t}, the logits {x}: pass both in one dtype"),
    ("device", ValueError, "teacher_logits is on {t}, the logits on {x}"),
)


def _check_dense(who: str, logits: Tensor, teacher_logits: object) -> None:
    """Dense teacher logits: a tensor of the logits' shape, dtype and device, without grad."""
    if not isinstance(teacher_logits, Tensor):
        raise TypeError(f"{who}: teacher_logits must be a tensor")
    refuse_grad(who, "teacher_logits", teacher_logits)
    for attr, error, message in _LIKE_LOGITS:
        t, x = getattr(teacher_logits, attr), getattr(logits, attr)
        if t != x:
            shown = (tuple(t), tuple(x)) if attr == "shape" else (t, x)
            raise error(f"{who}: " + message.format(t=shown[0], x=shown[1]))


def check_logits_call(
    who: str,
    logits: Tensor,
    teacher: Teacher,
    target: Tensor | None,
    opts: DistillOptions,
    sharded: bool = False,
) -> tuple[Tensor, Teacher, Tensor | None]:
    """The tensors of ``distillation_loss``; returns them as rows: logits (M, V), the teacher's
    rows, target (M,) or None."""
    check_tensors(who, logits=logits)
    if not logits.is_floating_point():
        raise TypeError(f"{who}: logits must be floating, got {logits.dtype}")
    # A vocabulary slice may hold no class (a rank of a skewed split); a whole row may not.
    if logits.dim() == 0 or (logits.shape[-1] == 0 and not sharded):
        raise ValueError(f"{who}: logits must have shape (..., V) with V >= 1")
    check_teacher_form(who, *teacher)
    V = logits.shape[-1]
    if teacher.logits is not None:
        _check_dense(who, logits, teacher.logits)
        teacher = teacher._replace(logits=as_rows(teacher.logits, V))
    lead = tuple(logits.shape[:-1])
    teacher, target = check_sparse_and_target(who, lead, logits.device, teacher, target, opts)
    return as_rows(logits, V), teacher, target


def check_head(
    who: str,
    head: tuple[Tensor, Tensor, Tensor | None],
    names: tuple[str, str, str],
    sharded: bool = False,
) -> None:
    """The tensors of one head: floating, one dtype and device, W (V, D) against input
    (..., D), b (V,) or None."""
    input, W, b = head
    n_in, n_w, n_b = names
    for name, t in zip(names, head, strict=True):
        if t is None and name == n_b:
            continue
        check_tensors(who, **{name: t})
        if not t.is_floating_point():
            raise TypeError(f"{who}: {name} must be floating, got {t.dtype}")
        if t.dtype != input.dtype:
            raise TypeError(
                f"{who}: {name} is {t.dtype}, {n_in} {input.dtype}: pass one dtype per head"
            )
        if t.device != input.device:
            raise ValueError(f"{who}: {name} is on {t.device}, {n_in} on {input.device}")
    if input.dim() == 0:
        raise ValueError(f"{who}: {n_in} must have shape (..., D)")
    # A vocabulary slice may hold no class (a rank of a skewed split); a whole head may not.
    if W.dim() != 2 or W.shape[1] != input.shape[-1] or (W.shape[0] == 0 and not sharded):
        raise ValueError(
            f"{who}: {n_w} must have shape (V, D) with V >= 1 and D = {n_in}.shape[-1] = "
            f"{input.shape[-1]}, got {tuple(W.shape)}"
        )
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"{who}: {n_b} must have shape ({W.shape[0]},), got {tuple(b.shape)}")


def check_teacher_head(
    who: str,
    head: tuple[Tensor | None, Tensor | None, Tensor | None],
    input: Tensor,
    V: int,
    sharded: bool = False,
) -> Tensor:
    """A dense teacher head (teacher_input (..., D_t), teacher_weight (V, D_t), teacher_bias)
    against the student's ``input`` and its V classes; returns teacher_input as (N, D_t) rows,
    contiguous."""
    t_input, t_weight, _ = head
    if t_input is None or t_weight is None:
        raise ValueError(f"{who}: teacher_input and teacher_weight go together; pass both")
    names = ("teacher_input", "teacher_weight", "teacher_bias")
    check_head(who, head, names, sharded)
    for name, t in zip(names, head, strict=True):
        refuse_grad(who, name, t)
    if t_weight.shape[0] != V:
        raise ValueError(
            f"{who}: teacher_weight has {t_weight.shape[0]} classes, linear_weight {V}"
        )
    lead = tuple(input.shape[:-1])
    if tuple(t_input.shape[:-1]) != lead:
        raise ValueError(
            f"{who}: teacher_input {tuple(t_input.shape)} must have the input's leading "
            f"shape {lead}"
        )
    if t_input.device != input.device:
        raise ValueError(f"{who}: the teacher is on {t_input.device}, the input on {input.device}")
    return t_input.reshape(-1, t_input.shape[-1]).contiguous()
