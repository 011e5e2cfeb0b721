"""The rows of the per-row statistics that every backend fills (see ``core`` for the contract).

A tiny module of its own so that the backends and ``core`` can name the rows without importing
each other.
"""

from __future__ import annotations

from torch import Tensor

# Always present: the row's loss, the row max m of z, log(sum exp(z - m)), the lse coefficient.
LOSS, MAX, LOG_SUM, COEF = range(4)
# With ``return_stats``: the z-loss part, the entropy of softmax(z), whether the argmax is right.
Z_PART, ENTROPY, CORRECT = range(4, 7)
STAT_ROWS = 4
EXTRA_STAT_ROWS = 7


def lse_of(stats: Tensor) -> Tensor:
    """(M,) log-sum-exp of z from per-row statistics: m + log_sum (-inf for a row with no finite
    logit)."""
    return stats[MAX] + stats[LOG_SUM]
