"""The teacher's tensors of one call, as the rows and loops below the public functions take them.

``Teacher``: the distribution the student is compared with, flattened to rows: dense logits, or
a sparse top-k (ids and log-probabilities). ``TeacherHead``: a dense teacher of the fused head,
whose logits are made chunk by chunk beside the student's.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Teacher(NamedTuple):
    """The teacher of M rows: ``logits`` (M, V) dense, or ``ids`` (M, k) int64 (-1: padding)
    with ``log_probs`` (M, k) sparse; the other form None.

    A tuple of tensors, so that ``save_for_backward(*teacher)`` keeps it and ``Teacher(*saved)``
    restores it.
    """

    logits: Tensor | None = None
    ids: Tensor | None = None
    log_probs: Tensor | None = None

    def rows(self, r: slice) -> Teacher:
        """The teacher of the rows ``r`` (views)."""
        return Teacher(*(t[r] if t is not None else None for t in self))


class TeacherHead(NamedTuple):
    """A dense teacher on the fused head: rows ``input`` (N, D_t), ``weight`` (V, D_t) and
    ``bias`` (V,) or None; its logits are ``input @ weight.T + bias``, made chunk by chunk."""

    input: Tensor
    weight: Tensor
    bias: Tensor | None

    @staticmethod
    def of(input: Tensor | None, weight: Tensor | None, bias: Tensor | None) -> TeacherHead | None:
        """The head of these tensors, or None where there is no dense teacher (``input`` None)."""
        return TeacherHead(input, weight, bias) if input is not None else None

    def contiguous(self) -> TeacherHead:
        """The head with the input and weight in the layout the chunk GEMMs write from."""
        return TeacherHead(self.input.contiguous(), self.weight.contiguous(), self.bias)
