"""Use fusedce's loss in other libraries' models, in one call.

- ``fusedce.integrations.transformers``: Hugging Face causal LMs (``apply(model)``, and
  ``causal_lm_loss`` for ``model.loss_function``).
- ``fusedce.integrations.litgpt``: litgpt's ``GPT`` (``apply(model)``).

Each submodule imports its library on import; ``import fusedce.integrations`` alone imports
neither (both are optional: ``pip install 'fusedce[integrations]'``).
"""

from __future__ import annotations

__all__ = ["litgpt", "transformers"]
