"""``fusedce.integrations.transformers.completion_log_probs`` on tiny random-init models (no
network): the log-probabilities and entropies of the completion tokens, and every parameter's
gradient, equal those computed from the model's own logits; docs/RL.md's GRPO step runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_integrations_transformers import _config  # noqa: E402

from fusedce.integrations import transformers as fi  # noqa: E402

RL_DOC = Path(__file__).resolve().parents[1] / "docs" / "RL.md"


def _own(model, ids, mask, K, T, completion_mask):
    """(logp, entropy) from the model's own (B, T, V) logits."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -K - 1 : -1].float() / T
    log_q = torch.log_softmax(logits, -1)
    logp = log_q.gather(-1, ids[:, -K:, None])[..., 0]
    ent = -(log_q.exp() * log_q).sum(-1)
    keep = completion_mask.bool()
    return torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)


# Why each: the plain head (Llama), an output bias (Phi), a logit scale folded into the
# temperature (Cohere).
@pytest.mark.parametrize("arch", ["llama", "phi", "cohere-scale"])
def test_completion_log_probs_match_the_models_own_logits(arch: str) -> None:
    cls, config = _config(arch)
    torch.manual_seed(0)
    model = cls(config).eval()
    B, L, K, T = 3, 10, 4, 0.7
    ids = torch.randint(config.vocab_size, (B, L))
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, :2] = 0  # left padding of a prompt
    cmask = torch.ones(B, K, dtype=torch.long)
    cmask[1, -1] = 0  # a padded completion token
    weights = torch.randn(2, B, K)

    logp, ent = fi.completion_log_probs(
        model, ids, attention_mask=attn, logits_to_keep=K, completion_mask=cmask, temperature=T,
        chunk_size=5,
    )  # fmt: skip
    ((logp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_lp, ref_ent = _own(model, ids, attn, K, T, cmask)
    ((ref_lp * weights[0]).sum() + (ref_ent * weights[1]).sum()).backward()
    torch.testing.assert_close(logp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert logp[1, -1] == 0 and ent[1, -1] == 0
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # Every position after the first by default; logp alone.
    lp_all = fi.completion_log_probs(
        model, ids, attention_mask=attn, temperature=T, return_entropy=False
    )
    assert lp_all.shape == (B, L - 1)
    torch.testing.assert_close(
        lp_all[:, -K:][cmask.bool()], logp[cmask.bool()].detach(), rtol=1e-5, atol=1e-5
    )


def test_completion_log_probs_refuses_what_it_cannot_compute() -> None:
    cls, config = _config("gemma2-softcap")
    model = cls(config)
    ids = torch.randint(config.vocab_size, (2, 6))
    with pytest.raises(NotImplementedError, match=r"^completion_log_probs: .*softcap"):
        fi.completion_log_probs(model, ids)
    with pytest.raises(TypeError, match=r"^completion_log_probs: "):
        fi.completion_log_probs(torch.nn.Linear(2, 2), ids)
    cls, config = _config("llama")
    model = cls(config)
    with pytest.raises(ValueError, match=r"^completion_log_probs: logits_to_keep"):
        fi.completion_log_probs(model, ids, logits_to_keep=6)
    with pytest.raises(ValueError, match=r"^completion_log_probs: completion_mask"):
        fi.completion_log_probs(model, ids, logits_to_keep=2, completion_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"^completion_log_probs: temperature"):
        fi.completion_log_probs(model, ids, temperature=0.0)


def test_rl_doc_grpo_step_runs() -> None:
    """docs/RL.md's code block, run as written; its fused log-probabilities match the policy's
    own logits and its step moved the parameters."""
    (code,) = re.findall(r"```python\n(.*?)```", RL_DOC.read_text(), flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(code, str(RL_DOC), "exec"), namespace)
    loss = namespace["loss"]
    assert torch.isfinite(loss)
    policy, seqs, K = namespace["policy"], namespace["seqs"], namespace["K"]
    with torch.no_grad():
        ours = fi.completion_log_probs(
            policy, seqs, logits_to_keep=K, temperature=namespace["T"], return_entropy=False
        )
        ref, _ = _own(policy, seqs, None, K, namespace["T"], torch.ones_like(ours))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert namespace["moved"] > 0
