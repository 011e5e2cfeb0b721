"""TRL: GRPO and RLOO trainers whose per-token log-probabilities come from fusedce's fused head.

TRL's ``GRPOTrainer`` computes every per-token log-probability it uses (the policy's in the
loss, the behaviour policy's for the importance ratio, the reference model's for the KL term)
and the entropies (the ``entropy`` metric, ``top_entropy_quantile``'s mask, ``entropy_coef``)
in one method, ``_get_per_token_logps_and_entropies``; ``RLOOTrainer`` has the same method.
``FusedLogProbsMixin`` overrides it with ``fusedce.integrations.transformers.completion_log_probs``:
the model's base, then ``fusedce.linear_token_log_probs`` on the hidden states that predict the
completion tokens and the model's output embedding. Nothing else in the trainer changes::

    from fusedce.integrations.trl import FusedGRPOTrainer

    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)
    trainer.train()

or, on a trainer class of your own, ``class MyTrainer(FusedLogProbsMixin, GRPOTrainer)``.

The numbers are TRL's: token t of a completion is scored by the hidden state at t - 1 under
softmax(logits / ``args.temperature``), the completion's padding (``attention_mask == 0``) gives 0
for both outputs and no gradient, the batch runs in slices of ``batch_size`` rows, under the
accelerator's autocast (with ``bf16=True``, TRL's default, both heads project in bfloat16). TRL's
own head accumulates in float32; fusedce's in float32, or float64 for a float64 model.

Refused, with a ValueError naming the option: ``cast_lm_head_to_fp32``, a PEFT model,
distributed training (the model wrapped by DDP, FSDP or DeepSpeed), an MoE load-balancing loss
(``router_aux_loss_coef``), a model config with ``final_logit_softcapping``, the multimodal
and token-type inputs (``pixel_values``, ``token_type_ids``, ...), and (at the first call) a model
wrapped by the accelerator, ``torch.compile`` included. Other architectures are those
``completion_log_probs`` accepts (it raises at the first log-probability call).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .transformers import completion_log_probs

try:
    from accelerate.utils import DistributedType, is_peft_model
    from trl import GRPOTrainer, RLOOTrainer
except ImportError as e:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "fusedce.integrations.trl needs TRL (Hugging Face's trainers): pip install 'fusedce[trl]'"
    ) from e

__all__ = ["FusedGRPOTrainer", "FusedLogProbsMixin", "FusedRLOOTrainer", "check_trainer"]


def check_trainer(trainer: Any) -> None:
    """Refuse the trainer settings under which the fused log-probabilities would not be TRL's.

    Args:
        trainer: a constructed TRL trainer (``GRPOTrainer`` or ``RLOOTrainer``, or a subclass).

    Raises:
        ValueError: naming the option: ``cast_lm_head_to_fp32``, a PEFT model, distributed
            training, an MoE load-balancing loss (``router_aux_loss_coef``), or a model whose
            config sets ``final_logit_softcapping``.
    """
    who = f"fusedce.integrations.trl ({type(trainer).__name__})"
    cap = getattr(trainer.model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(
            f"{who}: the model's config.final_logit_softcapping={cap}: the fused "
            "log-probabilities have no softcap; use the trainer itself"
        )
    if getattr(trainer.args, "cast_lm_head_to_fp32", False):
        raise ValueError(
            f"{who}: cast_lm_head_to_fp32=True is not supported: the fused head projects "
            "in the model's dtype (the autocast dtype under bf16), not in a float32 copy of the "
            "LM head outside autocast; leave cast_lm_head_to_fp32=False"
        )
    if is_peft_model(trainer.model):
        raise ValueError(
            f"{who}: PEFT models (peft_config, or a PeftModel) are not supported; use "
            "the trainer itself"
        )
    kind = trainer.accelerator.distributed_type
    if kind != DistributedType.NO:
        raise ValueError(
            f"{who}: distributed training ({kind}) is not supported: the fused head calls the "
            "model's base module directly, past the DDP / FSDP / DeepSpeed wrapper; run on one "
            "process or use the trainer itself"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(
            f"{who}: router_aux_loss_coef={trainer.args.router_aux_loss_coef} (an MoE "
            "load-balancing loss) is not supported: the fused head does not return router "
            "logits; set router_aux_loss_coef=0.0"
        )


class FusedLogProbsMixin:
    """Computes a TRL trainer's per-token log-probabilities and entropies with fusedce.

    Put it before the trainer class: ``class MyTrainer(FusedLogProbsMixin, GRPOTrainer)``. The
    constructor runs the trainer's, then ``check_trainer``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_trainer(self)

    def _get_per_token_logps_and_entropies(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **extra_inputs: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Per-token log-probabilities (and entropies) of the last ``logits_to_keep`` tokens.

        Args:
            model: the policy, the reference model or the trainer's prepared policy; a
                transformers causal LM that ``completion_log_probs`` accepts, unwrapped.
            input_ids: (B, T) prompt + completion ids (prompts left-padded).
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            logits_to_keep: K, the completion length.
            batch_size: rows per model call (None: all B at once).
            compute_entropy: also return the entropies.
            compute_aux_loss: must be False (MoE load-balancing losses are refused).
            **extra_inputs: TRL's multimodal and token-type inputs; each must be None.

        Returns:
            ``(logps, entropies, None)``: (B, K) float32 (float64 for a float64 model), 0 at
            padding; ``entropies`` is None without ``compute_entropy``.

        Raises:
            ValueError: ``compute_aux_loss``, a multimodal or token-type input, or a model
                wrapped by the accelerator (DDP, FSDP, ``torch.compile``).
        """
        who = "fusedce.integrations.trl"
        if logits_to_keep < 1:  # a slice [-0:] would take every position
            raise ValueError(f"{who}: logits_to_keep must be at least 1, got {logits_to_keep}")
        given = sorted(k for k, v in extra_inputs.items() if v is not None)
        if given:
            raise ValueError(
                f"{who}: {', '.join(given)} (multimodal or token-type inputs) are not supported; "
                "the fused head runs text-only causal LMs"
            )
        if compute_aux_loss:
            raise ValueError(
                f"{who}: compute_aux_loss (router_aux_loss_coef, an MoE load-balancing loss) is "
                "not supported"
            )
        if self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model:
            raise ValueError(
                f"{who}: the model is wrapped ({type(model).__name__}); the fused head calls the "
                "model's base module directly, which would bypass the wrapper"
            )
        rows = batch_size or input_ids.shape[0]
        logps, entropies = [], []
        for start in range(0, input_ids.shape[0], rows):
            ids = input_ids[start : start + rows]
            mask = attention_mask[start : start + rows]
            with self.accelerator.autocast():
                out = completion_log_probs(
                    model,
                    ids,
                    attention_mask=mask,
                    logits_to_keep=logits_to_keep,
                    completion_mask=mask[:, -logits_to_keep:],
                    temperature=self.temperature,
                    return_entropy=compute_entropy,
                    use_cache=False,  # no KV cache for a scoring pass
                )
            if compute_entropy:
                logps.append(out[0])
                entropies.append(out[1])
            else:
                logps.append(out)
        return (
            torch.cat(logps),
            torch.cat(entropies) if compute_entropy else None,
            None,
        )


class FusedGRPOTrainer(FusedLogProbsMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with its per-token log-probabilities and entropies from fusedce.

    Takes ``GRPOTrainer``'s arguments; refuses the settings ``check_trainer`` names.
    """


class FusedRLOOTrainer(FusedLogProbsMixin, RLOOTrainer):
    """TRL's ``RLOOTrainer`` with its per-token log-probabilities and entropies from fusedce.

    Takes ``RLOOTrainer``'s arguments; refuses the settings ``check_trainer`` names.
    """
