"""fusedce kernels: fused cross-entropy (loss + gradient in one pass) for PyTorch.

Public API, mirroring torch's own:
    cross_entropy          -- torch.nn.functional.cross_entropy
    CrossEntropyLoss       -- torch.nn.CrossEntropyLoss
"""

from .cross_entropy import CrossEntropyLoss, cross_entropy, set_target_check, uses_triton

__all__ = ["CrossEntropyLoss", "cross_entropy", "set_target_check", "uses_triton"]
