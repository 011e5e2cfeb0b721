"""fusedce kernels: fused cross-entropy (loss + gradient in one pass) for PyTorch.

Public API, mirroring torch's own:
    cross_entropy          -- torch.nn.functional.cross_entropy
    CrossEntropyLoss       -- torch.nn.CrossEntropyLoss
    linear_cross_entropy   -- torch.nn.functional.linear_cross_entropy (chunked, never N x V)
    LinearCrossEntropyLoss -- torch.nn.LinearCrossEntropyLoss
"""

from .cross_entropy import CrossEntropyLoss, cross_entropy, set_target_check, uses_triton
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "linear_cross_entropy",
    "set_target_check",
    "uses_triton",
]
