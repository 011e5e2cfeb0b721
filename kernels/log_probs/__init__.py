"""``token_log_probs`` and ``linear_token_log_probs``: per-token log-probabilities of the chosen
tokens, and the entropy, for RL trainers (GRPO / PPO / DPO build their losses from these).

The modules, bottom up: ``checks`` (argument checks, shared with the vocabulary-parallel path
``sharded.token_log_probs``), ``rows`` (forward and gradient rows of (M, V) logits on the row
contract), ``head`` (the fused linear head: chunks of x @ W.T through ``linear_chunks``),
``functions`` (the eager autograd Functions and the differentiable torch-ops form for
``torch.func``), ``custom_ops`` (the ``fusedce::`` ops ``torch.compile`` sees, with their fakes)
and ``api`` (the public functions, which ``fusedce`` exports). This file imports none of them, so
that importing one module of the package does not pull in the others (``sharded`` imports
``checks``, ``rows`` and ``head``; ``api`` imports ``sharded``).
"""
