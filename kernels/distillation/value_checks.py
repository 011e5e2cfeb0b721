"""The value checks of the distillation losses' tensors: the teacher's ids (in range, each once
per row), its sparse probability mass (at most 1 beyond rounding) and the target's class indices.

Counted on the device without a host sync; on CUDA with a gradient the count travels to the host
while the GPU works and is read in backward (``DeferredDistillCheck``, as the cross-entropy's
``index_check.DeferredIndexCheck``), else it is read at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import index_check
from ..options import accumulation_dtype
from .teacher import Teacher


def mass_tolerance(dtype: torch.dtype, k: int) -> float:
    """How far above 1 the teacher's sparse mass sum_S exp(log p) may be from rounding alone.

    Each log-probability is rounded to ``dtype`` (relative error eps / 2 of |log p|), which
    moves p by p |log p| eps / 2; summed over S that is at most eps / 2 times the entropy of
    the k probabilities (<= log k). The float32 sum of k terms adds up to k float32 ulps.
    """
    eps = torch.finfo(dtype).eps
    return eps * max(1.0, math.log(max(k, 1))) + k * torch.finfo(torch.float32).eps


def _sparse_mass(ids: Tensor, log_probs: Tensor) -> Tensor:
    """(..., ) sum over the row's ids (not the -1 pads) of exp(log p), in the accumulation dtype."""
    acc = accumulation_dtype(log_probs.dtype)
    return torch.where(ids >= 0, log_probs.to(acc).exp(), 0.0).sum(-1)


def _sparse_problems(ids: Tensor, log_probs: Tensor, V: int) -> tuple[Tensor, Tensor, Tensor]:
    """(M,) bool masks of the rows with an id outside [0, V) other than -1, with an id twice, and
    with a mass sum_S exp(log p) above 1 beyond rounding (NaN counts as above)."""
    out_of_range = ((ids < -1) | (ids >= V)).any(1)
    if ids.shape[1] > 1:
        s = ids.sort(1).values
        twice = ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any(1)
    else:
        twice = torch.zeros_like(out_of_range)
    mass = _sparse_mass(ids, log_probs)
    too_much = ~(mass <= 1.0 + mass_tolerance(log_probs.dtype, ids.shape[1]))
    return out_of_range, twice, too_much


class ValueCheck(NamedTuple):
    """The values of one call to check: the teacher's rows and the target (M,) against ``V``
    classes; ``who`` names the public function in the messages."""

    who: str
    V: int
    teacher: Teacher
    target: Tensor | None
    ignore_index: int

    def count_bad(self) -> Tensor | None:
        """() int32 device count of the rows with a bad value (teacher ids, sparse mass, target
        class index), no host sync; None when there is nothing to check or the check is off."""
        if not index_check.target_check_enabled():
            return None
        ids, target = self.teacher.ids, self.target
        counts = []
        if ids is not None and ids.numel():
            rows = torch.stack(_sparse_problems(ids, self.teacher.log_probs, self.V)).any(0)
            counts.append(rows.sum(dtype=torch.int32))
        if target is not None and target.numel():
            counts.append(index_check.count_bad_indices(target, self.V, self.ignore_index))
        if not counts:
            return None
        return counts[0] if len(counts) == 1 else counts[0] + counts[1]

    def raise_bad(self, earlier: bool = False) -> None:
        """Raises the error of the first bad value: IndexError for an id or class index,
        ValueError for a sparse mass above 1 (reads the tensors on the host: only called once a
        count says something is wrong)."""
        who, V, (_, ids, log_probs) = self.who, self.V, self.teacher
        later = " (in an earlier call, found when its count reached the host)" if earlier else ""
        if ids is not None and ids.numel():
            out_of_range, twice, too_much = _sparse_problems(ids, log_probs, V)
            if bool(out_of_range.any()):
                row = int(out_of_range.nonzero()[0, 0])
                bad = ids[row][(ids[row] < -1) | (ids[row] >= V)]
                raise IndexError(
                    f"{who}: teacher_ids holds {int(bad[0])} in row {row}, out of bounds for {V} "
                    f"classes (valid: 0..{V - 1}, or -1 for padding){later}"
                )
            if bool(twice.any()):
                row = int(twice.nonzero()[0, 0])
                raise IndexError(f"{who}: teacher_ids row {row} names a class twice{later}")
            if bool(too_much.any()):
                row = int(too_much.nonzero()[0, 0])
                mass = float(_sparse_mass(ids[row], log_probs[row]))
                raise ValueError(
                    f"{who}: the teacher's probabilities exp(teacher_log_probs) of row {row} sum "
                    f"to {mass}, above 1 beyond rounding{later}"
                )
        if self.target is not None:
            index_check.raise_bad_index(self.target, V, self.ignore_index, earlier, who)

    def run(self, defer: bool) -> DeferredDistillCheck | None:
        """Counts the bad values and raises now, or (``defer`` on CUDA) returns the check that
        backward resolves without a host sync."""
        if index_check.has_pending():
            index_check.raise_pending()  # counts of earlier calls that have arrived meanwhile
        n_bad = self.count_bad()
        if n_bad is None:
            return None
        if defer and n_bad.is_cuda:
            return DeferredDistillCheck(n_bad, self)
        if bool(n_bad):  # a host sync on CUDA (calls without a gradient)
            self.raise_bad()
        return None


class DeferredDistillCheck(index_check.DeferredIndexCheck):
    """The bad-value count of a CUDA call on its way to the host (see ``DeferredIndexCheck``):
    read in backward if it has arrived, else by the next fusedce call or
    ``wait_target_check()``."""

    def __init__(self, n_bad: Tensor, check: ValueCheck) -> None:
        t = check.teacher.ids if check.teacher.ids is not None else check.target
        super().__init__(n_bad, t, check.V, check.ignore_index, check.who)
        self._check = check

    def raise_bad(self, earlier: bool) -> None:
        """Raises the error of the first bad teacher id, log-probability or class index."""
        self._check.raise_bad(earlier=earlier)
