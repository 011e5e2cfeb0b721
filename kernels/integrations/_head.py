"""The fused output head shared by the integrations: loss from hidden states and the head weight.

The logit transforms some models apply after their output projection (a logit scale, a final
softcap) need the matching keyword arguments of ``fusedce.linear_cross_entropy``. Which ones it
has is read from its signature, so a model whose transform fusedce cannot express is refused
when the integration is applied, naming the config field, instead of training on other logits.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

import fusedce


def lce_supports(option: str) -> bool:
    """Whether ``fusedce.linear_cross_entropy`` takes the keyword argument ``option``."""
    return option in inspect.signature(fusedce.linear_cross_entropy).parameters


def logit_options(
    owner: str, logit_scale: float | None, softcap: float | None, fields: dict[str, str]
) -> dict[str, float]:
    """The extra ``linear_cross_entropy`` keyword arguments for a model's logit transforms.

    Args:
        owner: the model's name, for error messages.
        logit_scale: the factor the model multiplies its logits by (None: none).
        softcap: the model's final softcap ``c`` (``c * tanh(z / c)`` after the scale; None: none).
        fields: option name ("logit_scale", "softcap") -> the config field it comes from.

    Returns:
        Keyword arguments to pass on: empty for a model without transforms.

    Raises:
        NotImplementedError: the installed fusedce has no argument for a transform in use.
    """
    opts: dict[str, float] = {}
    for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
        if value is None or (name == "logit_scale" and value == 1.0):
            continue
        if not lce_supports(name):
            raise NotImplementedError(
                f"{owner} sets {fields[name]}={value}, which transforms the logits before the "
                f"loss; this fusedce's linear_cross_entropy has no `{name}=` argument to "
                "compute that loss fused, so the fused head cannot be applied to this model"
            )
        opts[name] = float(value)
    return opts


def shifted_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Next-token targets as transformers' ``ForCausalLMLoss`` builds them.

    Args:
        labels: (B, T) token ids (ignore_index where no loss is wanted).
        ignore_index: the label that contributes no loss.

    Returns:
        (B, T): ``labels[:, 1:]`` with ignore_index appended, so position t predicts token t + 1
        and the hidden states need no slicing (no copy).
    """
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int | None = None,
    options: dict[str, float] | None = None,
) -> Tensor:
    """The causal-LM loss of ``hidden @ weight.T + bias`` against ``targets``, never (N, V).

    Args:
        hidden: (..., D) final hidden states.
        weight: (V, D) output projection.
        bias: optional (V,) output bias.
        targets: class indices of shape ``hidden.shape[:-1]`` (already aligned: no shift here).
        ignore_index: the target that contributes no loss.
        num_items_in_batch: None gives the mean over non-ignored targets; otherwise the sum
            divided by it (transformers' convention for gradient accumulation).
        chunk_size: rows per chunk of ``linear_cross_entropy`` (None: its default).
        options: extra keyword arguments (logit scale, softcap) from ``logit_options``.

    Returns:
        The float32 scalar loss.
    """
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fusedce.linear_cross_entropy(
        hidden,
        weight,
        targets.to(hidden.device),
        linear_bias=bias,
        reduction=reduction,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        **(options or {}),
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# Set on the forward that an integration's ``apply`` installs on a model instance.
MARK = "__fusedce_forward__"


def is_applied(model: nn.Module) -> bool:
    """Whether an integration's ``apply`` has patched this model instance."""
    fwd = model.__dict__.get("forward")
    return fwd is not None and getattr(fwd, MARK, False)


def revert(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the model's own forward again. Returns ``model``."""
    if is_applied(model):
        del model.__dict__["forward"]
    return model
