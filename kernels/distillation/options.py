"""The options of the distillation losses, checked once per call (``check_distill_options``).

A module of its own, below the backends, so that the torch and Triton rows and the public
functions read the same ``DistillOptions`` (docs/DISTILLATION.md holds the definitions). The
options they share with the cross-entropy (``reduction``, ``ignore_index``) are checked by
``fusedce.options.check_options``, with its messages.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..options import LossOptions, check_options

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bin", "renormalize")
_FLOAT_MAX = sys.float_info.max


@dataclass(frozen=True)
class DistillOptions:
    """What a distillation loss computes, beyond its tensors.

    Attributes:
        divergence: "forward_kl", "reverse_kl" or "jsd".
        beta: the JSD's mixing weight in [0, 1] (m = beta p + (1 - beta) q).
        temperature: T > 0; the student sees z = logits / T (a dense teacher t / T).
        tail: "bin" or "renormalize" (sparse teachers only).
        ignore_index: target value of a row that is not counted.
        hard_weight: a in [0, 1]; row loss = (1 - a) D + a CE (CE at temperature 1).
        reduction: "none", "mean" or "sum".
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    tail: str = "bin"
    ignore_index: int = -100
    hard_weight: float = 0.0
    reduction: str = "mean"

    @property
    def code(self) -> int:
        """The divergence as the kernels' constexpr: 0 forward KL, 1 reverse KL, 2 JSD."""
        return DIVERGENCES.index(self.divergence)

    @property
    def bin(self) -> bool:
        """Whether a sparse teacher's classes outside its ids form one tail bin."""
        return self.tail == "bin"

    # The reduction's flags, read as the cross-entropy's: ``mean`` (averaged over the counted
    # rows) and ``per_row`` ("none": one loss per row, and one upstream factor per row).
    mean = LossOptions.mean
    per_row = LossOptions.per_row

    def as_args(self) -> tuple[str, float, float, str, int, float, str]:
        """The options as plain values, in field order (what the custom ops take)."""
        return (
            self.divergence,
            self.beta,
            self.temperature,
            self.tail,
            self.ignore_index,
            self.hard_weight,
            self.reduction,
        )


def _unit_float(who: str, name: str, value: object, low: float, high: float) -> float:
    """``value`` as a float in [low, high]; TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not low <= v <= high:  # NaN fails too
        got = "" if torch.compiler.is_compiling() else f", got {value}"
        raise ValueError(f"{who}: {name} must be in [{low}, {high}]{got}")
    return v


def check_distill_options(
    who: str,
    divergence: object,
    beta: object,
    temperature: object,
    tail: object,
    ignore_index: object,
    hard_weight: object,
    reduction: object,
) -> DistillOptions:
    """Validates the keyword options of ``distillation_loss`` / ``linear_distillation_loss``.

    Raises:
        ValueError, TypeError: naming the argument and the accepted values.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"{who}: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if tail not in TAILS:
        raise ValueError(f"{who}: tail must be one of {TAILS}, got {tail!r}")
    # The reduction and ignore_index rules (and messages) of cross_entropy; no label smoothing.
    ignore = check_options(who, ignore_index, 0.0, reduction).ignore_index
    b = _unit_float(who, "beta", beta, 0.0, 1.0)
    a = _unit_float(who, "hard_weight", hard_weight, 0.0, 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{who}: temperature must be a float > 0, got {type(temperature).__name__}")
    t = float(temperature)
    if not 0.0 < t <= _FLOAT_MAX:
        got = "" if torch.compiler.is_compiling() else f", got {temperature}"
        raise ValueError(f"{who}: temperature must be a finite float > 0{got}")
    return DistillOptions(str(divergence), b, t, str(tail), ignore, a, str(reduction))
