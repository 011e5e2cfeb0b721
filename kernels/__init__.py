"""fusedce: fused cross-entropy (loss + gradient in one pass) for PyTorch.

Public API, mirroring torch's own:
    cross_entropy          -- torch.nn.functional.cross_entropy
    CrossEntropyLoss       -- torch.nn.CrossEntropyLoss
    linear_cross_entropy   -- torch.nn.functional.linear_cross_entropy (chunked, never N x V)
    LinearCrossEntropyLoss -- torch.nn.LinearCrossEntropyLoss
    CrossEntropyStats      -- what ``return_stats=True`` returns (z_loss, lse, entropy, correct)

and the switches: ``set_target_check`` (the class-index range check) and the backend choice
(``available_backends``, ``get_backend``, ``set_backend``, ``use_backend``, ``uses_triton``).
The training stack lives in ``fusedce.lightning_modules`` and ``fusedce.datamodules`` (the
``fusedce[train]`` extra); importing ``fusedce`` alone needs only torch (and triton on GPUs).
"""

from .backends import available_backends, get_backend, set_backend, use_backend, uses_triton
from .core import CrossEntropyStats
from .cross_entropy_loss import CrossEntropyLoss, cross_entropy
from .index_check import set_target_check
from .linear_cross_entropy_loss import LinearCrossEntropyLoss, linear_cross_entropy

__all__ = [
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LinearCrossEntropyLoss",
    "available_backends",
    "cross_entropy",
    "get_backend",
    "linear_cross_entropy",
    "set_backend",
    "set_target_check",
    "use_backend",
    "uses_triton",
]
