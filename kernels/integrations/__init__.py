"""Use fusedce's loss in other libraries' models, in one call.

- ``fusedce.integrations.transformers``: Hugging Face causal LMs (``apply(model)``, and
  ``causal_lm_loss`` for ``model.loss_function``).
- ``fusedce.integrations.litgpt``: litgpt's ``GPT`` (``apply(model)``).
- ``fusedce.integrations.trl``: TRL's GRPO / RLOO trainers with their per-token log-probabilities
  from the fused head (``FusedGRPOTrainer``, ``FusedRLOOTrainer``).

Each submodule imports its library on import; ``import fusedce.integrations`` alone imports
none (all are optional: ``pip install 'fusedce[integrations]'``, ``'fusedce[trl]'``).
"""

from __future__ import annotations

__all__ = ["litgpt", "transformers", "trl"]
