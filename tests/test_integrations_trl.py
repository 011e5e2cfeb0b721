"""``fusedce.integrations.trl`` against TRL itself, on a tiny random Llama and an in-memory
character tokenizer (no network): the fused per-token log-probabilities and entropies equal
TRL's own method's (and, in float64, the model's own logits'), values and gradients, with padded
completions; a real ``GRPOTrainer`` trains the same with them; the unsupported options are
refused by name."""

from __future__ import annotations

import math
import string
from pathlib import Path

# TRL and its datasets come with the dev extra (pyproject.toml): no skip when they are missing.
import datasets
import pytest
import tokenizers
import torch
import transformers
import trl
from test_integrations_transformers import _DECODER

from fusedce.integrations import trl as ft

PAD, EOS = 0, 1
CHARS = string.ascii_lowercase + " "
V = 2 + len(CHARS)


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory: <pad>, <eos>, a-z and space."""
    vocab = {"<pad>": PAD, "<eos>": EOS, **{c: 2 + i for i, c in enumerate(CHARS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )


def _model(dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """The tiny random Llama of docs/RL.md on the character vocabulary; EOS made likely, so
    that some completions stop early and are padded."""
    sizes = {**_DECODER, "vocab_size": V}  # the integration tests' tiny decoder
    config = transformers.LlamaConfig(
        **sizes, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 4
    return model


def _config(tmp_path: Path, config_cls: type = trl.GRPOConfig, **overrides):
    options = {
        "output_dir": str(tmp_path / "out"),
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "save_strategy": "no",
        "logging_steps": 1,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "temperature": 0.9,
        "disable_tqdm": True,
    }
    return config_cls(**{**options, **overrides})


def _dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": ["abc", "hello w", "xy", "fused head"]})


def _reward(completions: list[str], **kwargs) -> list[float]:
    """A toy reward: the share of vowels in the completion."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def _trainer(cls: type, tmp_path: Path, model, **overrides):
    config_cls = trl.RLOOConfig if issubclass(cls, trl.RLOOTrainer) else trl.GRPOConfig
    return cls(
        model=model,
        reward_funcs=_reward,
        args=_config(tmp_path, config_cls, **overrides),
        train_dataset=_dataset(),
        processing_class=_tokenizer(),
    )


def _own(model, ids, mask, K, T):
    """(logp, entropy) (B, K) from the model's own (B, T, V) logits, 0 at padding."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -K - 1 : -1] / T
    log_q = torch.log_softmax(logits, -1)
    logp = log_q.gather(-1, ids[:, -K:, None])[..., 0]
    ent = -(log_q.exp() * log_q).sum(-1)
    keep = mask[:, -K:].bool()
    return torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)


def _grads(model, logp, ent, weights) -> dict[str, torch.Tensor]:
    model.zero_grad()
    ((logp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("stock_cls", "fused_cls"),
    [(trl.GRPOTrainer, ft.FusedGRPOTrainer), (trl.RLOOTrainer, ft.FusedRLOOTrainer)],
    ids=["grpo", "rloo"],
)
def test_log_probs_and_entropies_equal_trls_own_in_float64(
    tmp_path: Path, stock_cls: type, fused_cls: type
) -> None:
    """Left-padded prompts, completions padded after EOS, batch slices: the fused method's
    values and gradients (random upstream gradients) equal the model's own float64 logits' to
    float64 rounding, and TRL's own method's to its float32 rounding."""
    # bf16=False: TRL's config turns on bf16 autocast by default (on the CPU too), under which
    # TRL's head casts even float64 operands to bfloat16.
    # beta=0: no reference model (RLOO's default builds one from the model's hub name).
    options = {"bf16": False, "beta": 0.0}
    stock = _trainer(stock_cls, tmp_path / "stock", _model(torch.float64), **options)
    fused = _trainer(fused_cls, tmp_path / "fused", _model(torch.float64), **options)
    T, B, P, K = stock.temperature, 5, 6, 7
    assert T == fused.temperature == 0.9
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B, P + K), generator=gen)
    mask = torch.ones(B, P + K, dtype=torch.long)
    mask[0, :3] = 0  # prompt left padding
    mask[1, :1] = 0
    mask[2, -3:] = 0  # completions that ended early
    mask[3, -1:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    weights = torch.randn(2, B, K, generator=gen, dtype=torch.float64)

    results = {}
    for name, trainer in (("stock", stock), ("fused", fused)):
        logp, ent, aux = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, K, batch_size=2, compute_entropy=True
        )
        assert aux is None and logp.shape == ent.shape == (B, K)
        results[name] = (logp, ent, _grads(trainer.model, logp, ent, weights))
    own_lp, own_ent = _own(fused.model, ids, mask, K, T)
    results["own"] = (own_lp, own_ent, _grads(fused.model, own_lp, own_ent, weights))

    lp, ent, grads = results["fused"]
    assert lp.dtype == ent.dtype == torch.float64
    assert (lp[mask[:, -K:] == 0] == 0).all() and (ent[mask[:, -K:] == 0] == 0).all()
    exact = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(lp, results["own"][0], **exact)
    torch.testing.assert_close(ent, results["own"][1], **exact)
    for n, g in grads.items():
        torch.testing.assert_close(g, results["own"][2][n], **exact, msg=n)
    # TRL's chunked head accumulates in float32 whatever the model's dtype.
    f32 = {"rtol": 1e-5, "atol": 1e-5}
    s_lp, s_ent, s_grads = results["stock"]
    torch.testing.assert_close(lp, s_lp.double(), **f32)
    torch.testing.assert_close(ent, s_ent.double(), **f32)
    for n, g in grads.items():
        torch.testing.assert_close(g, s_grads[n].double(), **f32, msg=n)

    # Without the entropy: the log-probabilities alone, no entropies.
    logp, none, _ = fused._get_per_token_logps_and_entropies(fused.model, ids, mask, K)
    assert none is None
    torch.testing.assert_close(logp, results["own"][0].detach(), **exact)


def _train(cls: type, tmp_path: Path, model_dir: Path, **overrides):
    trainer = _trainer(cls, tmp_path, str(model_dir), **overrides)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, logs


# float32: the two heads agree to float32 rounding. bf16: TRL's default (its config turns on
# bf16 autocast, on the CPU too), where both heads run the projection in bfloat16 and agree to
# its rounding (a step of learning_rate=0.5 carries the first step's differences into the second).
@pytest.mark.parametrize(
    ("bf16", "rel", "abs_", "weights"), [(False, 1e-4, 1e-5, 1e-5), (True, 5e-3, 1e-4, 1e-3)]
)
def test_grpo_trainer_trains_the_same_with_the_fused_head(
    tmp_path: Path, bf16: bool, rel: float, abs_: float, weights: float
) -> None:
    """Two optimizer steps on one generation (num_iterations=2: the behaviour policy's
    log-probabilities and a ratio away from 1), a reference model (beta), an entropy bonus and
    the high-entropy token mask: every logged metric and the trained weights equal the stock
    trainer's on the same RNG seed."""
    model_dir = tmp_path / "model"
    _model().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    options = {
        "max_steps": 2,
        "num_iterations": 2,
        "beta": 0.04,
        "entropy_coef": 0.01,
        "top_entropy_quantile": 0.5,
        "optim": "sgd",
        "learning_rate": 0.5,
        "bf16": bf16,
    }
    stock, stock_logs = _train(trl.GRPOTrainer, tmp_path / "stock", model_dir, **options)
    fused, fused_logs = _train(ft.FusedGRPOTrainer, tmp_path / "fused", model_dir, **options)
    assert len(stock_logs) == len(fused_logs) == 2
    # Some completions stopped at EOS: padded ones.
    assert fused_logs[0]["completions/min_length"] < 8
    for ours, theirs in zip(fused_logs, stock_logs, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            if key == "step_time":
                continue
            assert math.isfinite(ours[key]), key
            assert ours[key] == pytest.approx(theirs[key], rel=rel, abs=abs_), key
    assert fused_logs[1]["kl"] > 0 and fused_logs[1]["clip_ratio/region_mean"] > 0
    theirs = dict(stock.model.named_parameters())
    for n, p in fused.model.named_parameters():
        torch.testing.assert_close(p, theirs[n], rtol=rel, atol=weights, msg=n)


def test_refused_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32"):
        _trainer(ft.FusedGRPOTrainer, tmp_path, _model(), cast_lm_head_to_fp32=True)
    small = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    small |= {"num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": PAD}
    gemma2 = transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**small, head_dim=8, final_logit_softcapping=5.0)
    )
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        _trainer(ft.FusedGRPOTrainer, tmp_path, gemma2)
    mixtral = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**small, num_local_experts=2, num_experts_per_tok=1)
    )
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        _trainer(ft.FusedGRPOTrainer, tmp_path, mixtral)

    fused = _trainer(ft.FusedGRPOTrainer, tmp_path, _model())
    ids = torch.randint(2, V, (2, 6))
    mask = torch.ones_like(ids)
    call = fused._get_per_token_logps_and_entropies
    for option in ("pixel_values", "token_type_ids", "mm_token_type_ids"):
        with pytest.raises(ValueError, match=option):
            call(fused.model, ids, mask, 3, **{option: torch.zeros_like(ids)})
    with pytest.raises(ValueError, match="compute_aux_loss"):
        call(fused.model, ids, mask, 3, compute_aux_loss=True)
    with pytest.raises(ValueError, match="wrapped"):
        call(torch.compile(fused.model), ids, mask, 3)
    with pytest.raises(ValueError, match="logits_to_keep must be at least 1, got 0"):
        call(fused.model, ids, mask, 0)
