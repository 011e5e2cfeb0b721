"""fusedce.integrations.transformers against the models' own losses, on tiny random-init models.

Every supported architecture: the patched model's loss and every parameter's gradient equal the
unpatched model's on the same batch (padding labels included), calls without labels and
generate() are unchanged, num_items_in_batch divides the summed loss as transformers does, a
Trainer run with gradient accumulation follows the unpatched one, and architectures or logit
transforms fusedce cannot express raise instead of computing another loss; a mixture-of-experts
head (Mixtral) adds its load-balancing loss as the model does.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedce.integrations import transformers as fi  # noqa: E402
from fusedce.integrations._head import lce_supports  # noqa: E402

V = 512  # vocabulary
B, T = 2, 12
HAS_SOFTCAP = lce_supports("softcap")
HAS_LOGIT_SCALE = lce_supports("logit_scale")

_DECODER = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _config(arch: str) -> tuple[type, object]:
    """(model class, tiny config) for an architecture name used in the tests."""
    t = transformers
    if arch == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(**_DECODER)
    if arch == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(**_DECODER)
    if arch == "qwen2":
        return t.Qwen2ForCausalLM, t.Qwen2Config(**_DECODER)
    if arch == "qwen3":
        return t.Qwen3ForCausalLM, t.Qwen3Config(**_DECODER, head_dim=8)
    if arch == "gpt2":
        cfg = t.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0
        )
        cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        return t.GPT2LMHeadModel, cfg
    if arch == "phi3":
        return t.Phi3ForCausalLM, t.Phi3Config(**_DECODER, pad_token_id=0)
    if arch == "phi":  # an output bias
        return t.PhiForCausalLM, t.PhiConfig(**_DECODER)
    if arch == "gemma":
        return t.GemmaForCausalLM, t.GemmaConfig(**_DECODER, head_dim=8)
    if arch == "gemma2":
        cfg = t.Gemma2Config(**_DECODER, head_dim=8, final_logit_softcapping=None)
        return t.Gemma2ForCausalLM, cfg
    if arch == "gemma2-softcap":
        cfg = t.Gemma2Config(**_DECODER, head_dim=8, final_logit_softcapping=5.0)
        return t.Gemma2ForCausalLM, cfg
    if arch == "gemma3":
        return t.Gemma3ForCausalLM, t.Gemma3TextConfig(**_DECODER, head_dim=8)
    if arch == "gemma3-softcap":
        cfg = t.Gemma3TextConfig(**_DECODER, head_dim=8, final_logit_softcapping=5.0)
        return t.Gemma3ForCausalLM, cfg
    if arch == "cohere":
        return t.CohereForCausalLM, t.CohereConfig(**_DECODER, logit_scale=1.0)
    if arch == "cohere-scale":
        return t.CohereForCausalLM, t.CohereConfig(**_DECODER, logit_scale=0.25)
    if arch == "granite":
        return t.GraniteForCausalLM, t.GraniteConfig(**_DECODER, logits_scaling=1.0)
    if arch == "granite-scale":
        return t.GraniteForCausalLM, t.GraniteConfig(**_DECODER, logits_scaling=4.0)
    raise KeyError(arch)


def _pair(arch: str, **kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unpatched, patched) copies of one random-init model, in train mode."""
    cls, cfg = _config(arch)
    torch.manual_seed(0)
    ref = cls(cfg).train()
    return ref, fi.apply(copy.deepcopy(ref), **kwargs)


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T): row 1 left-padded, its padding -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


def _assert_same_grads(ref: torch.nn.Module, new: torch.nn.Module, atol: float = 1e-5) -> None:
    g_ref, g_new = _grads(ref), _grads(new)
    assert g_ref.keys() == g_new.keys()
    for name, g in g_ref.items():
        assert g is not None and g_new[name] is not None, name
        torch.testing.assert_close(g_new[name], g, atol=atol, rtol=1e-4, msg=name)


PLAIN = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "phi", "gemma", "gemma2"]
PLAIN += ["gemma3", "cohere", "granite"]
SOFTCAP = ["gemma2-softcap", "gemma3-softcap"]
SCALED = ["cohere-scale", "granite-scale"]


@pytest.mark.parametrize("arch", PLAIN)
def test_loss_and_gradients_match_the_model(arch: str) -> None:
    ref, new = _pair(arch)
    ids, mask, labels = _batch()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out_new = new(input_ids=ids, attention_mask=mask, labels=labels)
    assert out_new.logits is None  # the (B, T, V) logits were never built
    assert type(out_new) is type(out_ref)
    torch.testing.assert_close(out_new.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    out_ref.loss.backward()
    out_new.loss.backward()
    _assert_same_grads(ref, new)


@pytest.mark.parametrize("arch", SOFTCAP + SCALED)
def test_logit_transforms_are_applied_or_refused(arch: str) -> None:
    field = {"gemma2": "final_logit_softcapping", "gemma3": "final_logit_softcapping"}
    field.update({"cohere": "logit_scale", "granite": "logits_scaling"})
    name = field[arch.split("-")[0]]
    supported = HAS_SOFTCAP if arch in SOFTCAP else HAS_LOGIT_SCALE
    if not supported:
        with pytest.raises(NotImplementedError, match=name):
            _pair(arch)
        return
    ref, new = _pair(arch)
    ids, mask, labels = _batch()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out_new = new(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_new.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    out_ref.loss.backward()
    out_new.loss.backward()
    _assert_same_grads(ref, new)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_without_labels_and_generate_are_unchanged(arch: str) -> None:
    ref, new = _pair(arch)
    ids, mask, _ = _batch()
    a, b = ref(input_ids=ids, attention_mask=mask), new(input_ids=ids, attention_mask=mask)
    assert type(a) is type(b)
    assert torch.equal(a.logits, b.logits)
    ref.eval()
    new.eval()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ref.generate(ids, **kw), new.generate(ids, **kw))


def test_num_items_in_batch_divides_the_sum() -> None:
    ref, new = _pair("llama")
    ids, mask, labels = _batch()
    n_valid = int((labels[:, 1:] != -100).sum())
    mean = new(input_ids=ids, attention_mask=mask, labels=labels).loss
    for n in (torch.tensor(3 * n_valid), 3 * n_valid):  # a tensor from Trainer, or a plain int
        own = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
        fused = new(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
        torch.testing.assert_close(fused, own, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fused, mean / 3, atol=1e-6, rtol=1e-5)


def test_shift_labels_and_tuple_output() -> None:
    ref, new = _pair("qwen2")
    ids, mask, labels = _batch()
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    own = ref(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift)
    fused = new(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift)
    torch.testing.assert_close(fused.loss, own.loss, atol=1e-5, rtol=1e-5)
    # positional input_ids, return_dict=False: a tuple whose first element is the loss
    tup = new(ids, mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], own.loss, atol=1e-5, rtol=1e-5)


def test_eval_mode_and_fuse_in_eval() -> None:
    ref, new = _pair("llama", fuse_in_eval=False)
    ids, mask, labels = _batch()
    ref.eval()
    new.eval()
    own = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = new(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and torch.equal(out.logits, own.logits)
    fused = fi.apply(copy.deepcopy(ref)).eval()
    out = fused(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, own.loss, atol=1e-5, rtol=1e-5)


def test_patch_keeps_signature_state_and_copies() -> None:
    ref, new = _pair("mistral")
    assert inspect.signature(new.forward) == inspect.signature(ref.forward)
    assert new.state_dict().keys() == ref.state_dict().keys()
    assert fi.is_applied(new) and not fi.is_applied(ref)
    assert fi.apply(new) is new  # twice: a no-op
    twin = copy.deepcopy(new)
    assert fi.is_applied(twin) and twin.forward.__self__ is twin
    ids, _, labels = _batch()
    assert fi.revert(new) is new and not fi.is_applied(new)
    assert new(input_ids=ids, labels=labels).logits is not None


def test_loss_function_callable_matches_for_causal_lm_loss() -> None:
    ref = _pair("gemma3")[0]
    new = copy.deepcopy(ref)
    new.loss_function = fi.causal_lm_loss
    ids, mask, labels = _batch()
    for n in (None, torch.tensor(40)):
        own = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
        out = new(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
        torch.testing.assert_close(out.loss, own.loss, atol=1e-5, rtol=1e-5)
        assert out.logits is not None
    ref.zero_grad()
    own.loss.backward()
    out.loss.backward()
    _assert_same_grads(ref, new)
    # apply() on top accepts it (the same loss) and fuses
    assert fi.apply(new)(input_ids=ids, labels=labels).logits is None


def test_loss_function_callable_reads_half_precision_logits() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True)
    _, _, labels = _batch()
    ours = fi.causal_lm_loss(logits, labels, V)
    theirs = ForCausalLMLoss(logits, labels, V)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours.float(), g_theirs.float(), atol=1e-3, rtol=1e-2)


def test_unsupported_models_raise_clearly() -> None:
    t = transformers
    opt_cfg = t.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4
    )
    opt_cfg.word_embed_proj_dim = 32
    opt_cfg.dropout = 0.0
    torch.manual_seed(0)
    opt = t.OPTForCausalLM(opt_cfg).train()
    with pytest.raises(NotImplementedError, match=r"OPTForCausalLM.*strict=False"):
        fi.apply(copy.deepcopy(opt))
    # strict=False: a plain causal LM outside the list works the same way
    new = fi.apply(copy.deepcopy(opt), strict=False)
    ids, mask, labels = _batch()
    own = opt(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(new(input_ids=ids, attention_mask=mask, labels=labels).loss, own)

    t5 = t.T5ForConditionalGeneration(
        t.T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    )
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        fi.apply(t5)

    cls, cfg = _config("llama")

    class Custom(cls):
        def forward(self, *args, **kwargs):  # type: ignore[override]
            return super().forward(*args, **kwargs)

    with pytest.raises(NotImplementedError, match="overrides the forward"):
        fi.apply(Custom(cfg))

    model = cls(cfg)
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(ValueError, match="custom loss_function"):
        fi.apply(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fi.apply(torch.nn.Linear(2, 2))


def _mixtral(output_router_logits: bool) -> torch.nn.Module:
    """A tiny random-init Mixtral (4 experts, 2 per token, aux coefficient 0.5), train mode."""
    cfg = transformers.MixtralConfig(
        **_DECODER,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.5,
        output_router_logits=output_router_logits,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).train()


@pytest.mark.parametrize(
    ("in_config", "in_call"),
    [(True, None), (False, True), (True, False), (False, None)],
    ids=["config", "call", "call-off", "off"],
)
def test_moe_router_aux_loss_is_added_as_the_model_does(
    in_config: bool, in_call: bool | None
) -> None:
    """Mixtral adds router_aux_loss_coef * load-balancing loss whenever router logits are
    output (from the config or the call); the fused loss, its aux_loss and every gradient
    (the routers' included) equal the model's own."""
    ref = _mixtral(in_config)
    new = fi.apply(copy.deepcopy(ref), strict=False)
    ids, mask, labels = _batch()
    call = {} if in_call is None else {"output_router_logits": in_call}
    own = ref(input_ids=ids, attention_mask=mask, labels=labels, **call)
    out = new(input_ids=ids, attention_mask=mask, labels=labels, **call)
    assert out.logits is None and type(out) is type(own)
    if in_call if in_call is not None else in_config:
        assert own.aux_loss is not None and own.aux_loss.detach() > 0
        torch.testing.assert_close(out.aux_loss, own.aux_loss)
    else:
        assert own.aux_loss is None and out.aux_loss is None
    torch.testing.assert_close(out.loss, own.loss, atol=1e-5, rtol=1e-5)
    own.loss.backward()
    out.loss.backward()
    _assert_same_grads(ref, new)


def test_moe_head_whose_aux_loss_is_unknown_is_refused() -> None:
    """A mixture-of-experts head without the parts of its load-balancing loss is refused
    instead of training without it."""
    model = _mixtral(True)
    del model.num_experts
    with pytest.raises(NotImplementedError, match="router auxiliary loss"):
        fi.apply(model, strict=False)
    assert not fi.is_applied(model)


def test_unnamed_loss_type_is_named_for_the_unfused_calls() -> None:
    """GPT-2's loss_type is None (transformers warns on each own-forward loss); apply() names
    it ForCausalLM, the same loss, and revert() clears it again."""
    ref, new = _pair("gpt2", fuse_in_eval=False)
    assert ref.loss_type is None and new.loss_type == "ForCausalLM"
    ids, mask, labels = _batch()
    own = ref.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = new.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, own)
    assert fi.revert(new).loss_type is None


def test_adamw_run_tracks_the_unpatched_run() -> None:
    ref, new = _pair("llama")
    losses = []
    for model in (ref, new):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        run = []
        for step in range(20):
            ids, mask, labels = _batch(seed=100 + step % 4)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=2e-4, rtol=0)


def test_bf16_autocast_close_to_the_model() -> None:
    ref, new = _pair("qwen3")
    ids, mask, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        fused = new(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, own.float(), atol=2e-2, rtol=0)
    fused.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in new.parameters())


def test_trainer_with_gradient_accumulation_matches() -> None:
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids, mask, labels = _batch(seed=10 + i)
            # rows with different numbers of targets: the mean-of-means would differ
            return {"input_ids": ids[i % 2], "attention_mask": mask[i % 2], "labels": labels[i % 2]}

    def train(model: torch.nn.Module, out: str) -> list[float]:
        args = transformers.TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            data_seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    import tempfile

    ref, new = _pair("llama")
    with tempfile.TemporaryDirectory() as d:
        own, fused = train(ref, d + "/ref"), train(new, d + "/new")
    assert len(own) == len(fused) == 3
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(own), atol=1e-4, rtol=0)
    for p_ref, p_new in zip(ref.parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(p_new, p_ref, atol=1e-5, rtol=1e-4)


def test_compile_fullgraph_of_the_patched_forward() -> None:
    """torch.compile(fullgraph=True) traces the patched forward and the fused head: no graph break,
    the same loss and gradients."""
    ref, new = _pair("llama")
    ids, mask, labels = _batch()
    own = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch._dynamo.reset()
    compiled = torch.compile(new, fullgraph=True, backend="aot_eager")
    start = time.perf_counter()
    loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert time.perf_counter() - start < 120
    torch.testing.assert_close(loss, own, atol=1e-5, rtol=1e-5)
    own.backward()
    _assert_same_grads(ref, new)


def test_source_tree_is_not_imported_as_kernels() -> None:
    """transformers imports a top-level `kernels` when it finds one; fusedce's source directory
    (named kernels/ in a checkout) must not be it, or fusedce's custom ops register twice."""
    import sys

    cls, cfg = _config("llama")
    cls(cfg)  # transformers looks for its kernel hub here
    mod = sys.modules.get("kernels")
    assert mod is None or not hasattr(mod, "linear_cross_entropy")
    with pytest.raises(ImportError, match="import it as `fusedce`"):
        importlib.import_module("kernels")
