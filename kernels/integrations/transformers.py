"""Hugging Face transformers: train a causal LM with fusedce's fused head, in one call.

``apply(model)`` makes ``model(..., labels=labels)`` compute its loss with
``fusedce.linear_cross_entropy`` on the final hidden states and the output embedding: the
(B, T, V) logits are never materialised, and the returned output has ``logits=None``. Calls
without labels (inference, ``generate()``) run the model's own forward unchanged.

The loss is transformers' ``ForCausalLMLoss``: labels shifted left by one inside, ``-100``
ignored, and with ``num_items_in_batch`` (what ``Trainer`` passes under gradient accumulation) the
sum over the batch divided by it instead of the mean. ``causal_lm_loss`` is the same loss on
logits, for ``model.loss_function`` when the logits are wanted anyway.

Only architectures whose forward is known are accepted (``SUPPORTED``): everything up to the
output projection runs in the model's own base module (``model.base_model``), and the logit
transforms after it (Gemma 2/3's final softcap, Cohere's logit scale, Granite's logit divisor) are
read from the config and handed to ``linear_cross_entropy``, or refused when the installed fusedce
cannot express them. A mixture-of-experts head (Mixtral-style: ``router_aux_loss_coef``) adds its
load-balancing loss as the model does, whenever router logits are output.

``completion_log_probs(model, input_ids, ...)`` gives RL trainers the per-token log-probabilities
(and entropies) of a batch's completion tokens through the same fused head, in one call.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import fusedce

from ..options import check_temperature
from ._head import MARK as _MARK
from ._head import head_loss, is_applied, logit_options, shifted_labels
from ._head import revert as _revert_forward

try:
    import transformers
    from transformers.modeling_outputs import (
        CausalLMOutputWithCrossAttentions,
        CausalLMOutputWithPast,
        MoeCausalLMOutputWithPast,
    )
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "fusedce.integrations.transformers needs Hugging Face transformers: "
        "pip install 'fusedce[integrations]'"
    ) from e

__all__ = ["SUPPORTED", "apply", "causal_lm_loss", "completion_log_probs", "is_applied", "revert"]

# (logit_scale, softcap) the model applies after its output projection, and the config fields
# they come from (for error messages).
_Transforms = tuple[float | None, float | None, dict[str, str]]


def _plain(model: nn.Module) -> _Transforms:
    return None, None, {}


def _final_softcap(model: nn.Module) -> _Transforms:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return None, cap, {"softcap": "config.final_logit_softcapping"}


def _cohere_scale(model: nn.Module) -> _Transforms:
    return model.logit_scale, None, {"logit_scale": "config.logit_scale"}


def _granite_divisor(model: nn.Module) -> _Transforms:
    div = model.config.logits_scaling
    return 1.0 / div, None, {"logit_scale": "config.logits_scaling (as 1 / logits_scaling)"}


# Model class -> its logit transforms. Each forward is `base_model(...)`, then
# `lm_head(last_hidden_state)`, then these transforms, then `self.loss_function` (the tests check
# every one of them against the model's own loss and gradients).
SUPPORTED: dict[str, Callable[[nn.Module], _Transforms]] = {
    "LlamaForCausalLM": _plain,
    "MistralForCausalLM": _plain,
    "Qwen2ForCausalLM": _plain,
    "Qwen3ForCausalLM": _plain,
    "GPT2LMHeadModel": _plain,
    "Phi3ForCausalLM": _plain,
    "PhiForCausalLM": _plain,
    "GemmaForCausalLM": _plain,
    "Gemma2ForCausalLM": _final_softcap,
    "Gemma3ForCausalLM": _final_softcap,
    "CohereForCausalLM": _cohere_scale,
    "GraniteForCausalLM": _granite_divisor,
}

# Config fields that change the logits after the projection, in architectures not listed above.
_GENERIC_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Arguments of a causal LM's forward that belong to its head and loss, not to its base model.
_HEAD_ARGS = ("labels", "logits_to_keep", "return_dict")

# Set on the patched forward when apply() named the model's loss_type (`revert` clears it).
_NAMED_LOSS_TYPE = "__fusedce_named_loss_type__"


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` computed by ``fusedce.cross_entropy``.

    For ``model.loss_function = causal_lm_loss`` (a plain function: an ``nn.Module`` assigned
    there would be registered as a submodule and ignored). The logits are not upcast to float32
    first (fusedce reads half precision directly and accumulates in float32), so no float32 copy
    of (B, T, V) is made.

    Args:
        logits: (B, T, V) logits, any float dtype.
        labels: (B, T) token ids; shifted left by one inside (position t predicts t + 1).
        vocab_size: V.
        num_items_in_batch: None: mean over non-ignored targets; otherwise the sum divided by it.
        ignore_index: the label that contributes no loss.
        shift_labels: (B, T) targets already aligned with the logits (then labels is unused).
        **kwargs: other loss arguments transformers passes (ignored, as ``ForCausalLMLoss``).

    Returns:
        The float32 scalar loss. With every target ignored the mean is 0, where transformers
        gives NaN.
    """
    if shift_labels is None:
        shift_labels = shifted_labels(labels, ignore_index)
    # view, not a copy: no shift of the logits, the last position's target is ignore_index.
    flat = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fusedce.cross_entropy(flat, targets, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _transforms_of(model: nn.Module, strict: bool) -> tuple[str, _Transforms]:
    """The supported class ``model`` is (or inherits unchanged), and its logit transforms."""
    cls = type(model)
    for base in cls.__mro__:
        if base.__name__ in SUPPORTED and getattr(transformers, base.__name__, None) is base:
            if cls.forward is not base.forward:
                raise NotImplementedError(
                    f"{cls.__name__} overrides the forward of {base.__name__}: fusedce cannot "
                    "know what it does with the logits; apply() supports the classes in "
                    "fusedce.integrations.transformers.SUPPORTED as transformers defines them"
                )
            return base.__name__, SUPPORTED[base.__name__](model)
    if strict:
        raise NotImplementedError(
            f"{cls.__name__} is not an architecture fusedce.integrations.transformers knows "
            f"(supported: {', '.join(sorted(SUPPORTED))}). If its forward is "
            "`lm_head(base_model(...).last_hidden_state)` followed by transformers' causal-LM "
            "loss, apply(model, strict=False) uses the fused head anyway"
        )
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if scale is not None and divisor is not None:
        raise NotImplementedError(
            f"{cls.__name__} sets both config.logit_scale and config.logits_scaling: "
            "their order is not known"
        )
    if divisor is not None:
        scale = 1.0 / divisor
    fields = {
        "softcap": "config.final_logit_softcapping",
        "logit_scale": "config.logit_scale" if divisor is None else "config.logits_scaling",
    }
    return cls.__name__, (scale, cap, fields)


# The load-balancing loss of a mixture-of-experts head: (the model's module-level
# `load_balancing_loss_func`, num_experts, num_experts_per_tok, router_aux_loss_coef).
_RouterAux = tuple[Callable[..., Tensor], int, int, float]


def _router_aux_of(model: nn.Module) -> _RouterAux | None:
    """The load-balancing loss the model's own forward adds to its loss, or None for a dense
    head; a head that adds one in a way not known here is refused (never silently dropped)."""
    forward = type(model).forward
    adds_aux = "load_balancing_loss_func" in getattr(forward, "__code__", forward).co_names
    if not adds_aux and not hasattr(model, "router_aux_loss_coef"):
        return None
    # Mixtral, Qwen2-MoE, OLMoE, ...: `loss += router_aux_loss_coef * load_balancing_loss_func(
    # router_logits, num_experts, num_experts_per_tok, attention_mask)`; the function lives in
    # the module that defines the forward.
    func = getattr(sys.modules.get(forward.__module__), "load_balancing_loss_func", None)
    parts = [getattr(model, k, None) for k in ("num_experts", "num_experts_per_tok")]
    coef = getattr(model, "router_aux_loss_coef", None)
    if func is None or None in parts or coef is None:
        raise NotImplementedError(
            f"{type(model).__name__} adds a router auxiliary loss that apply() does not know "
            "how to compute; the fused loss would leave it out"
        )
    return func, int(parts[0]), int(parts[1]), float(coef)


def _check_model(model: nn.Module) -> nn.Linear:
    """The output projection of a decoder-only causal LM, or a clear error."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"apply() expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"{type(model).__name__} is an encoder-decoder model; apply() handles causal LMs"
        )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"{type(model).__name__}.get_output_embeddings() is "
            f"{type(head).__name__ if head is not None else None}, not an nn.Linear: "
            "the fused head needs the (V, D) projection weight"
        )
    own = getattr(model, "_loss_function", None)
    if own is not None and own is not causal_lm_loss:
        raise ValueError(
            f"{type(model).__name__} has a custom loss_function ({own!r}); apply() would "
            "replace it with the causal-LM cross-entropy. Remove it first"
        )
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(
            f"{type(model).__name__} has loss_type={loss_type!r}; apply() computes the "
            "'ForCausalLM' loss only"
        )
    return head


def apply(
    model: nn.Module,
    *,
    fuse_in_eval: bool = True,
    chunk_size: int | None = None,
    strict: bool = True,
) -> nn.Module:
    """Make a transformers causal LM compute its loss with fusedce's fused linear cross-entropy.

    Patches this one instance (not its class) by setting ``model.forward``; the parameters,
    ``state_dict``, config and ``save_pretrained`` output do not change, and the forward keeps
    its signature (``Trainer`` and ``generate()`` inspect it). Calling it again is a no-op;
    ``revert(model)`` undoes it.

    A call with ``labels`` (and ``logits_to_keep`` left at 0) runs ``model.base_model`` and
    computes the loss from its ``last_hidden_state`` and ``model.get_output_embeddings()``:
    ``loss`` as the model's own, ``logits`` None; ``past_key_values``, ``hidden_states`` and
    ``attentions`` as the model returns them. Every other call runs the model's own forward.

    Args:
        model: a causal LM, e.g. ``AutoModelForCausalLM.from_pretrained(...)``.
        fuse_in_eval: also fuse in eval mode (``model.eval()``). False gives eval-mode calls
            with labels the model's own forward and logits (what ``Trainer.evaluate`` with
            ``compute_metrics`` needs).
        chunk_size: rows per chunk of ``linear_cross_entropy`` (None: its default).
        strict: accept only the classes in ``SUPPORTED``. False accepts any causal LM whose
            forward is ``lm_head(base_model(...).last_hidden_state)`` then transformers' loss,
            with the logit transforms read from the generic config fields.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: not a transformers model.
        NotImplementedError: an architecture not known (with strict), an encoder-decoder, an
            output embedding that is not an ``nn.Linear``, or a logit transform (softcap, logit
            scale) this fusedce's ``linear_cross_entropy`` has no argument for.
        ValueError: the model has a custom ``loss_function`` or ``loss_type``.
    """
    if is_applied(model):
        return model
    _check_model(model)
    name, (logit_scale, softcap, fields) = _transforms_of(model, strict)
    options = logit_options(name, logit_scale, softcap, fields)
    router_aux = _router_aux_of(model)

    cls_forward = type(model).forward
    params = list(inspect.signature(cls_forward).parameters.values())[1:]  # without self
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(cls_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(
                f"{type(self).__name__}.forward takes {len(positional)} positional arguments"
            )
        kwargs.update(zip(positional, args, strict=False))
        labels = kwargs.get("labels")
        keep = kwargs.get("logits_to_keep", 0)
        if (
            labels is None
            or not (isinstance(keep, int) and keep == 0)
            or (not self.training and not fuse_in_eval)
        ):
            return cls_forward(self, **kwargs)
        return _fused_forward(self, kwargs, options, chunk_size, router_aux)

    setattr(forward, _MARK, True)
    if getattr(model, "loss_type", None) is None:
        # transformers' `loss_function` falls back to ForCausalLM (the loss apply() checked for)
        # with a warning on each unfused call with labels (eval with fuse_in_eval=False); naming
        # it makes those calls quiet and changes no loss. `revert` clears it again.
        model.loss_type = "ForCausalLM"
        setattr(forward, _NAMED_LOSS_TYPE, True)
    # A bound method in the instance dict: copy.deepcopy rebinds it to the copy.
    model.forward = types.MethodType(forward, model)
    return model


def _fused_forward(
    model: nn.Module,
    kwargs: dict[str, Any],
    options: dict[str, float],
    chunk_size: int | None,
    router_aux: _RouterAux | None = None,
) -> Any:
    """The patched forward with labels: base model, then the fused head loss (plus a
    mixture-of-experts head's load-balancing loss where router logits are output)."""
    labels = kwargs["labels"]
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(model.config, "use_return_dict", True)
    base_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ARGS}
    if router_aux is not None:  # the model's own forward resolves it from the config, too
        want = kwargs.get("output_router_logits")
        base_kwargs["output_router_logits"] = (
            getattr(model.config, "output_router_logits", False) if want is None else want
        )
    # ForCausalLMLoss reads these from the kwargs the forward passes to both the base model and
    # the loss; the base model ignores them, as in the model's own forward.
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    num_items_in_batch = kwargs.get("num_items_in_batch")
    outputs = model.base_model(**base_kwargs, return_dict=True)
    hidden = outputs.last_hidden_state  # (B, T, D)
    head = model.get_output_embeddings()
    if shift_labels is None:
        shift_labels = shifted_labels(labels, ignore_index)
    loss = head_loss(
        hidden,
        head.weight,
        head.bias,
        shift_labels,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        options=options,
    )
    extra: dict[str, Any] = {}
    if router_aux is not None:
        extra["aux_loss"] = None
        if base_kwargs["output_router_logits"]:
            func, n_experts, top_k, coef = router_aux
            aux = func(outputs.router_logits, n_experts, top_k, kwargs.get("attention_mask"))
            loss = loss + coef * aux.to(loss.device)
            extra["aux_loss"] = aux
    # GPT-2-style bases return cross-attentions, and so does the model's own output then.
    out_cls = (
        MoeCausalLMOutputWithPast
        if router_aux is not None
        else CausalLMOutputWithCrossAttentions
        if "cross_attentions" in type(outputs).__dataclass_fields__
        else CausalLMOutputWithPast
    )
    fields = {
        k: getattr(outputs, k, None)
        for k in out_cls.__dataclass_fields__
        if k not in ("loss", "logits", *extra)
    }
    result = out_cls(loss=loss, logits=None, **fields, **extra)
    return result if return_dict else result.to_tuple()


def revert(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the model's own forward (and its unnamed ``loss_type``) again. Returns
    ``model``."""
    if is_applied(model) and getattr(model.__dict__["forward"], _NAMED_LOSS_TYPE, False):
        model.loss_type = None
    return _revert_forward(model)


def completion_log_probs(
    model: nn.Module,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    logits_to_keep: int | None = None,
    completion_mask: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = True,
    chunk_size: int | None = None,
    **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probabilities (and entropies) of the last ``logits_to_keep`` tokens of each
    sequence under ``model``, through ``fusedce.linear_token_log_probs``: the (B, T, V) logits
    are never materialised, in forward or backward.

    Token t of ``input_ids`` is scored by the hidden state at t - 1, as the model's own logits
    ``logits[:, t - 1]`` would: log softmax(logits / T)[input_ids[:, t]]. Works on any model
    ``apply`` accepts (patched or not: the base model and the output embedding are called
    directly), and its gradients reach every parameter the logits depend on.

    Args:
        model: a transformers causal LM of ``SUPPORTED`` (a final softcap is refused; a logit
            scale or divisor folds into the temperature).
        input_ids: (B, T) prompt + completion token ids.
        attention_mask: (B, T) as the model takes it, or None.
        logits_to_keep: K, the completion length: the last K tokens are scored. None: all
            T - 1 tokens after the first.
        completion_mask: (B, K) 1 for the tokens to score, 0 for padding (those give 0 and no
            gradient), or None (all).
        temperature: T > 0; the sampling temperature of the rollouts.
        return_entropy: also return the entropy of each scored position's distribution.
        chunk_size: token rows per chunk of the fused head (None: its default).
        **model_kwargs: passed to ``model.base_model`` (``position_ids``, ...).

    Returns:
        ``(logp, entropy)`` (B, K) float32, or ``logp`` alone without ``return_entropy``.

    Raises:
        TypeError, NotImplementedError, ValueError: as ``apply`` for the model; ValueError for
            a ``logits_to_keep`` or ``completion_mask`` that does not fit ``input_ids``.
    """
    who = "completion_log_probs"
    temperature = check_temperature(who, temperature)
    try:
        head = _check_model(model)
        name, (logit_scale, softcap, _fields) = _transforms_of(model, strict=True)
    except (TypeError, ValueError, NotImplementedError) as e:
        # apply()'s checks, named after the function called here.
        raise type(e)(f"{who}: {e}") from e
    if softcap is not None:
        raise NotImplementedError(
            f"{who}: {name} applies a final softcap to its logits; the fused log-probabilities "
            "have no softcap"
        )
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"{who}: input_ids must be (B, T) with T >= 2, got {input_ids.shape}")
    T = input_ids.shape[1]
    K = T - 1 if logits_to_keep is None else logits_to_keep
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= T - 1:
        raise ValueError(f"{who}: logits_to_keep must be an int in [1, {T - 1}], got {K!r}")
    targets = input_ids[:, T - K :]
    if completion_mask is not None:
        if tuple(completion_mask.shape) != tuple(targets.shape):
            raise ValueError(
                f"{who}: completion_mask must have shape {tuple(targets.shape)}, got "
                f"{tuple(completion_mask.shape)}"
            )
        targets = torch.where(completion_mask.to(torch.bool), targets, -100)
    outputs = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **model_kwargs
    )
    # The positions that predict the kept tokens: a view, no copy of (B, T, D).
    hidden = outputs.last_hidden_state[:, T - K - 1 : T - 1]
    # A logit scale s multiplies the logits before the softmax: softmax(s x / T).
    scale = 1.0 if logit_scale is None else float(logit_scale)
    return fusedce.linear_token_log_probs(
        hidden,
        head.weight,
        targets,
        linear_bias=head.bias,
        temperature=temperature / scale,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
    )
