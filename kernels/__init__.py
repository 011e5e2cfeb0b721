"""fusedce: fused cross-entropy (loss + gradient in one pass) for PyTorch.

Public API, mirroring torch's own:
    cross_entropy          -- torch.nn.functional.cross_entropy
    CrossEntropyLoss       -- torch.nn.CrossEntropyLoss
    linear_cross_entropy   -- torch.nn.functional.linear_cross_entropy (chunked, never N x V)
    LinearCrossEntropyLoss -- torch.nn.LinearCrossEntropyLoss
    token_log_probs        -- per-token log-probabilities (and entropy) for RL, from logits
    linear_token_log_probs -- the same from the linear head (chunked, never N x V)
    CrossEntropyStats      -- what ``return_stats=True`` returns (z_loss, lse, entropy, correct)
    distillation_loss      -- forward / reverse KL or JSD to a dense or top-k teacher
    linear_distillation_loss -- the same on the fused linear head (never N x V)

and the switches: ``set_target_check`` / ``wait_target_check`` (the class-index range check) and
the backend choice
(``available_backends``, ``get_backend``, ``set_backend``, ``use_backend``, ``uses_triton``;
``set_cpu_compile`` for the Inductor-compiled CPU rows).
The training stack lives in ``fusedce.lightning_modules`` and ``fusedce.datamodules`` (the
``fusedce[train]`` extra); importing ``fusedce`` alone needs only torch (and triton on GPUs).
``fusedce.__version__`` is the installed version.
"""

# In a checkout this directory is named kernels/, and with the checkout on sys.path (python -m
# from its root) `import kernels` finds it: transformers, for one, tries to import Hugging Face's
# `kernels` package. Loaded under a second name, every module would run again and register the
# custom ops twice, which corrupts torch's dispatcher. Refuse before anything is registered.
if __name__ != "fusedce":
    raise ImportError(
        f"{__name__!r} is fusedce's source directory ({__file__}), not a package of its own: "
        "import it as `fusedce`"
    )

from ._version import version as _installed_version
from .backends import available_backends, get_backend, set_backend, use_backend, uses_triton
from .backends.cpu_compiled import set_cpu_compile
from .core import CrossEntropyStats
from .cross_entropy_loss import CrossEntropyLoss, cross_entropy
from .distillation.api import distillation_loss, linear_distillation_loss
from .index_check import set_target_check, wait_target_check
from .linear_cross_entropy_loss import LinearCrossEntropyLoss, linear_cross_entropy
from .log_prob_functions import linear_token_log_probs, token_log_probs
from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__version__ = _installed_version()

__all__ = [
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LinearCrossEntropyLoss",
    "available_backends",
    "cross_entropy",
    "distillation_loss",
    "get_backend",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_token_log_probs",
    "set_backend",
    "set_cpu_compile",
    "set_target_check",
    "token_log_probs",
    "use_backend",
    "uses_triton",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "wait_target_check",
]
