"""The rows of the per-row statistics that every backend fills (see ``core`` for the contract).

A tiny module of its own so that the backends and ``core`` can name the rows without importing
each other; ``CrossEntropyStats`` is what ``return_stats`` makes of them.
"""

from __future__ import annotations

from typing import NamedTuple

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


class CrossEntropyStats(NamedTuple):
    """What ``return_stats=True`` returns next to the loss; detached tensors.

    Attributes:
        z_loss: the z-loss part of the loss alone (sum_i t_i * lambda * lse_i**2 over the
            non-ignored elements), reduced as the loss is: () or the per-element shape.
        lse: log-sum-exp of the (scaled, softcapped) logits z, per element (the target's
            shape for class indices, the input's shape without the class dimension for
            probabilities); computed for ignored elements too.
        entropy: entropy H(softmax(z)) = lse - sum_c p_c z_c per element.
        correct: bool per element: argmax(z) (first maximum, as ``torch.argmax``) equals the
            class index, or the argmax of the probability target; False where ignored.
            Accuracy is ``correct.sum() / valid.sum()``.
    """

    z_loss: Tensor
    lse: Tensor
    entropy: Tensor
    correct: Tensor
