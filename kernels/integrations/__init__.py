"""Use fusedce's loss in other libraries' models, in one call.

- ``fusedce.integrations.transformers``: Hugging Face causal LMs (``apply(model)``, and
  ``causal_lm_loss`` for ``model.loss_function``).
- ``fusedce.integrations.litgpt``: litgpt's ``GPT`` (``apply(model)``).

Each submodule imports its library on import; ``import fusedce.integrations`` alone imports
neither (both are optional: ``pip install 'fusedce[integrations]'``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["litgpt", "transformers"]


def _block_source_tree_as_kernels() -> None:
    """Keep fusedce's source directory from being imported a second time as ``kernels``.

    In a checkout the package's source directory is named ``kernels/``; with the checkout on
    ``sys.path`` (``python -m ...`` from its root) ``import kernels`` finds it. transformers
    imports ``kernels`` (Hugging Face's kernel hub) when it is importable, which would load every
    fusedce module again and register its custom ops twice, corrupting the dispatcher (crashes
    in ``torch.compile``). A ``kernels`` that is fusedce's own source is marked not importable.
    """
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None:
        return
    src = Path(spec.origin).parent
    if not ((src / "linear_cross_entropy_loss.py").is_file() and (src / "integrations").is_dir()):
        return  # a real `kernels` package
    if sys.modules.get("kernels") is not None:
        raise ImportError(
            f"fusedce's source directory {src} was imported as the package `kernels` (it is "
            "on sys.path, e.g. `python -m` from the repository root, and something imported "
            "`kernels`): its custom ops are now registered twice. Import fusedce.integrations "
            "before transformers creates a model, or run from outside the repository"
        )
    sys.modules["kernels"] = None  # `import kernels` raises ImportError: transformers skips it


_block_source_tree_as_kernels()
