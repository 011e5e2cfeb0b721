"""litgpt: train a ``litgpt.GPT`` with fusedce's fused head.

litgpt's ``GPT.forward`` returns logits and its training loops compute the loss outside the
model (``chunked_cross_entropy(model(input_ids), targets)``), so there is no loss to swap in
place. ``apply(model)`` instead gives the forward one more keyword, ``targets``:

    model = fusedce.integrations.litgpt.apply(GPT(config))
    loss = model(input_ids, targets=targets)  # chunked_cross_entropy(model(input_ids), targets)
    logits = model(input_ids)  # unchanged, as is generation (input_pos=...)

``targets`` are aligned with ``input_ids`` position by position, as litgpt's loops build them
(``input_ids = data[:, :-1]``, ``targets = data[:, 1:]``): no shift inside. The loss is the mean
over targets other than ``ignore_index`` (-100), as ``chunked_cross_entropy`` (except that every
target ignored gives 0 where litgpt gives NaN). The (B, T, V) logits are never materialised:
``hidden_states(model, input_ids)`` runs the transformer up to the final norm, and
``fusedce.linear_cross_entropy`` takes it from there with ``model.lm_head``, applying
``config.final_logit_softcapping`` inside when the installed fusedce can (otherwise ``apply``
refuses a softcapped model).
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
from torch import Tensor, nn

from ._head import MARK as _MARK
from ._head import head_loss, is_applied, logit_options, revert

try:
    from litgpt.model import GPT
except ImportError as e:  # pragma: no cover - exercised only without litgpt
    raise ImportError(
        "fusedce.integrations.litgpt needs litgpt: pip install 'fusedce[integrations]'"
    ) from e

__all__ = ["apply", "hidden_states", "is_applied", "revert"]


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"apply() expects a litgpt.GPT, got {type(model).__name__}")
    if type(model).forward is not GPT.forward:
        raise NotImplementedError(
            f"{type(model).__name__} overrides litgpt.GPT.forward: fusedce cannot know how it "
            "computes its hidden states; apply() supports litgpt.GPT's own forward"
        )
    if not isinstance(model.lm_head, nn.Linear):
        raise NotImplementedError(
            f"model.lm_head is {type(model.lm_head).__name__}, not an nn.Linear: the fused head "
            "needs the (V, D) projection weight"
        )


def hidden_states(model: nn.Module, idx: Tensor) -> Tensor:
    """The final hidden states of a litgpt ``GPT`` (after ``ln_f``, before ``lm_head``).

    ``GPT.forward`` without a KV cache (training), stopped before the output projection.

    Args:
        model: a ``litgpt.GPT``.
        idx: (B, T) token ids.

    Returns:
        (B, T, n_embd) hidden states, so that ``model.lm_head(h)`` (then the final softcap, if
        any) are ``model(idx)``'s logits.
    """
    config = model.config
    T = idx.size(1)
    if model.max_seq_length < T:
        raise ValueError(
            f"Cannot forward sequence of length {T}, max seq length is only {model.max_seq_length}."
        )
    cos = model.cos[:T].unsqueeze(0)
    sin = model.sin[:T].unsqueeze(0)
    x = model.transformer.wte(idx)
    if config.scale_embeddings:
        x = x * torch.tensor(config.n_embd**0.5, dtype=x.dtype)
    rope_indices = getattr(config, "rope_indices", None)
    for block_idx, block in enumerate(model.transformer.h):
        if rope_indices is not None:
            idxs = rope_indices[block_idx]
            x = block(x, cos[..., idxs], sin[..., idxs], None, None, None)
        else:
            x = block(x, cos, sin, None, None, None)
    return model.transformer.ln_f(x)


def apply(
    model: nn.Module, *, ignore_index: int = -100, chunk_size: int | None = None
) -> nn.Module:
    """Give a litgpt ``GPT`` the fused loss: ``model(input_ids, targets=targets)`` returns it.

    Patches this one instance (``model.forward``; parameters and ``state_dict`` unchanged).
    Calls without ``targets`` run litgpt's own forward. Calling it again is a no-op;
    ``revert(model)`` undoes it.

    Args:
        model: a ``litgpt.GPT``.
        ignore_index: the target that contributes no loss.
        chunk_size: rows per chunk of ``linear_cross_entropy`` (None: its default).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: not a ``litgpt.GPT``.
        NotImplementedError: a subclass with its own forward, an ``lm_head`` that is not an
            ``nn.Linear``, or ``config.final_logit_softcapping`` set while this fusedce's
            ``linear_cross_entropy`` has no ``softcap=`` argument.
    """
    if is_applied(model):
        return model
    _check_model(model)
    options = logit_options(
        f"litgpt model {model.config.name!r}",
        None,
        model.config.final_logit_softcapping,
        {"softcap": "config.final_logit_softcapping"},
    )
    own = GPT.forward

    @functools.wraps(own)
    def forward(self: nn.Module, *args: Any, targets: Tensor | None = None, **kwargs: Any) -> Any:
        if targets is None:
            return own(self, *args, **kwargs)
        if args[1:] or kwargs:
            raise ValueError(
                "model(idx, targets=...) computes the training loss: input_pos, "
                "input_pos_maxp1 and lm_head_chunk_size do not apply to it"
            )
        idx = args[0] if args else kwargs["idx"]
        head = self.lm_head
        return head_loss(
            hidden_states(self, idx),
            head.weight,
            head.bias,
            targets,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            options=options,
        )

    # The signature shows the new keyword (litgpt's own, plus targets).
    sig = inspect.signature(own)
    targets_param = inspect.Parameter(
        "targets", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Tensor | None"
    )
    forward.__signature__ = sig.replace(parameters=[*sig.parameters.values(), targets_param])
    setattr(forward, _MARK, True)
    model.forward = types.MethodType(forward, model)
    return model
