"""fusedce.integrations.litgpt against litgpt's own logits and loss, on tiny random-init GPTs."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

pytest.importorskip("litgpt")

from litgpt import Config
from litgpt.model import GPT
from litgpt.utils import chunked_cross_entropy

from fusedce.integrations import litgpt as fl
from fusedce.integrations._head import lce_supports

V = 500
SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=V, padded_vocab_size=512, block_size=32)
ARCHS = {
    "pythia-14m": dict(SMALL),  # LayerNorm, biases, parallel residual
    "Llama-3.2-1B": dict(SMALL, n_query_groups=2, head_size=16, intermediate_size=128),
    "Qwen3-0.6B": dict(SMALL, n_query_groups=2, head_size=16, intermediate_size=128),
    "phi-2": dict(SMALL, intermediate_size=128),  # an output bias
    "gemma-2-2b": dict(SMALL, n_query_groups=2, head_size=16, intermediate_size=128),
}


def _pair(name: str) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    ref = GPT(Config.from_name(name, **ARCHS[name]))
    return ref, fl.apply(copy.deepcopy(ref))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), (2, 15): litgpt's alignment, padding targets -100."""
    data = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(seed))
    targets = data[:, 1:].clone()
    targets[1, :5] = -100
    return data[:, :-1], targets


@pytest.mark.parametrize("name", list(ARCHS))
def test_loss_and_gradients_match_litgpt(name: str) -> None:
    if Config.from_name(name).final_logit_softcapping and not lce_supports("softcap"):
        with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
            _pair(name)
        return
    ref, new = _pair(name)
    x, y = _batch()
    own = chunked_cross_entropy(ref(x), y, chunk_size=0)
    fused = new(x, targets=y)
    torch.testing.assert_close(fused, own, atol=1e-5, rtol=1e-5)
    own.backward()
    fused.backward()
    for (n, a), b in zip(ref.named_parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_logits_and_kv_cache_forward_unchanged() -> None:
    ref, new = _pair("Llama-3.2-1B")
    x, _ = _batch()
    assert torch.equal(ref(x), new(x))
    assert torch.equal(fl.hidden_states(new, x) @ new.lm_head.weight.T, new(x))
    for m in (ref, new):
        m.set_kv_cache(batch_size=2)
    pos = torch.arange(x.shape[1])
    assert torch.equal(ref(x, input_pos=pos), new(x, input_pos=pos))


def test_patch_signature_copy_revert_and_errors() -> None:
    ref, new = _pair("pythia-14m")
    assert "targets" in inspect.signature(new.forward).parameters
    assert new.state_dict().keys() == ref.state_dict().keys()
    assert fl.apply(new) is new and fl.is_applied(new)
    twin = copy.deepcopy(new)
    assert twin.forward.__self__ is twin
    x, y = _batch()
    with pytest.raises(ValueError, match="input_pos"):
        new(x, input_pos=torch.arange(x.shape[1]), targets=y)
    with pytest.raises(TypeError, match=r"litgpt\.GPT"):
        fl.apply(torch.nn.Linear(2, 2))
    fl.revert(new)
    with pytest.raises(TypeError):
        new(x, targets=y)


def test_adamw_run_tracks_litgpt() -> None:
    ref, new = _pair("Qwen3-0.6B")
    runs = []
    for model, fused in ((ref, False), (new, True)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        run = []
        for step in range(20):
            x, y = _batch(seed=100 + step % 4)
            loss = model(x, targets=y) if fused else chunked_cross_entropy(model(x), y, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        runs.append(run)
    assert runs[1][-1] < runs[1][0] - 0.5
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), atol=2e-4, rtol=0)


def test_compile_fullgraph() -> None:
    ref, new = _pair("Llama-3.2-1B")
    x, y = _batch()
    torch._dynamo.reset()
    loss = torch.compile(new, fullgraph=True, backend="aot_eager")(x, targets=y)
    torch.testing.assert_close(loss, chunked_cross_entropy(ref(x), y, 0), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in new.parameters())
