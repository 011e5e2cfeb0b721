"""The one-pass extras of ``linear_cross_entropy`` (logit_scale, softcap, z_loss, token_weight,
return_stats) against float64 ``F.linear`` followed by their definitions.

Kernel suite (marker ``kernel``): the chunks go through the Triton interpreter or the torch
fallback. The stats come from the chunks the loop computes anyway.
"""

from __future__ import annotations

import pytest
import torch

import fusedce
from ce_reference import check_linear_extras, make_linear_case
from fusedce.linear_cross_entropy_loss import _lce_op

pytestmark = pytest.mark.kernel

ALL = dict(logit_scale=1.5, softcap=4.0, z_loss=0.02, token_weight=True)
ALONE = {
    "logit_scale": dict(logit_scale=0.5),
    "softcap": dict(softcap=2.0),  # the logits are O(1): a cap of 2 bends them
    "z_loss": dict(z_loss=0.05),
    "token_weight": dict(token_weight=True),
    "stats": dict(return_stats=True),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(ALONE))
def test_option_alone(name, reduction):
    """(2, 5) tokens in chunks of 3: a ragged last chunk, and stats gathered across chunks."""
    o = dict(ALONE[name])
    rs = o.pop("return_stats", False)
    x, W, b, t = make_linear_case((2, 5), 8, 37, torch.float32, bias=True, ignore_frac=0.2)
    check_linear_extras(x, W, b, t, reduction=reduction, chunk_size=3, return_stats=rs, **o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_options_together(reduction, dtype):
    """Every option with class weights, ignore_index and smoothing, in each dtype."""
    x, W, b, t = make_linear_case((11,), 16, 37, dtype, bias=True, ignore_frac=0.2)
    w = torch.rand(37, generator=torch.Generator().manual_seed(3)) + 0.5
    check_linear_extras(
        x, W, b, t, weight=w, label_smoothing=0.1, reduction=reduction, chunk_size=4, **ALL
    )


def test_two_sweep_vocabulary():
    """A prime vocabulary above the interpreter's one-tile size: the two-sweep kernel path, its
    stats gathered across chunks, and the recomputed gradient of "none" (the scalar reductions
    on that path are covered in test_extras.py; here they cost the interpreter too long)."""
    x, W, _, t = make_linear_case((3,), 8, 16411, torch.float32, ignore_frac=0.2)
    check_linear_extras(x, W, None, t, reduction="none", chunk_size=2, **ALL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_edge_shapes(reduction):
    """V = 1, V = 2, one token, no token: each with every option."""
    for lead, V in (((4,), 1), ((5,), 2), ((1,), 9), ((0,), 9)):
        x, W, _, t = make_linear_case(lead, 4, V, torch.float32)
        check_linear_extras(x, W, None, t, reduction=reduction, **ALL)


def test_matches_cross_entropy_on_materialised_logits():
    """Loss and stats equal fusedce.cross_entropy on the full logits."""
    x, W, b, t = make_linear_case((3, 4), 8, 37, torch.float32, bias=True, ignore_frac=0.25)
    tw = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))
    kw = dict(logit_scale=0.9, softcap=3.0, z_loss=0.01, token_weight=tw, return_stats=True)
    loss, stats = fusedce.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=5, **kw)
    logits = torch.nn.functional.linear(x, W, b)
    ref, ref_stats = fusedce.cross_entropy(
        logits.reshape(-1, 37),
        t.reshape(-1),
        **{
            **kw,
            "token_weight": tw.reshape(-1),
        },
    )
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(stats.z_loss, ref_stats.z_loss)
    torch.testing.assert_close(stats.lse.reshape(-1), ref_stats.lse)
    torch.testing.assert_close(stats.entropy.reshape(-1), ref_stats.entropy)
    assert torch.equal(stats.correct.reshape(-1), ref_stats.correct)


def test_module_forwards_the_options():
    head = torch.nn.Linear(8, 37)
    mod = fusedce.LinearCrossEntropyLoss.from_linear(
        head, logit_scale=0.5, softcap=6.0, z_loss=1e-3, return_stats=True
    )
    x, _, _, t = make_linear_case((6,), 8, 37, torch.float32)
    tw = torch.rand(6)
    loss, stats = mod(x, t, tw)
    ref, ref_stats = fusedce.linear_cross_entropy(
        x,
        head.weight,
        t,
        linear_bias=head.bias,
        logit_scale=0.5,
        softcap=6.0,
        z_loss=1e-3,
        token_weight=tw,
        return_stats=True,
    )
    torch.testing.assert_close(loss, ref)
    assert torch.equal(stats.correct, ref_stats.correct)
    assert "softcap=6.0" in repr(mod)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"logit_scale": 0.0}, ValueError, "linear_cross_entropy: logit_scale"),
        ({"softcap": -1.0}, ValueError, "linear_cross_entropy: softcap"),
        ({"z_loss": -0.5}, ValueError, "linear_cross_entropy: z_loss"),
        ({"token_weight": torch.ones(5)}, ValueError, "token_weight must have"),
        ({"token_weight": torch.ones(4, dtype=torch.int32)}, TypeError, "floating point"),
        ({"token_weight": torch.tensor([1.0, -2.0, 1, 1])}, ValueError, "negative"),
        ({"token_weight": torch.tensor([1.0, float("nan"), 1, 1])}, ValueError, "non-finite"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    x, W, _, t = make_linear_case((4,), 3, 5, torch.float32)
    with pytest.raises(exc, match=match):
        fusedce.linear_cross_entropy(x, W, t, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_with_options(reduction):
    x, W, b, t = make_linear_case((6,), 4, 11, torch.float32, bias=True)
    x.requires_grad_()
    W.requires_grad_()
    torch.library.opcheck(
        _lce_op,
        (x, W, b, t, None, -100, 0.1, reduction, 4, "float32", [True, True, False]),
        {"logit_scale": 0.8, "softcap": 3.0, "z_loss": 0.01, "token_weight": torch.rand(6)},
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_with_options(reduction):
    """torch.compile(fullgraph=True) with every option and the stats: same numbers as eager."""
    x, W, _, t = make_linear_case((7,), 8, 23, torch.float32, ignore_frac=0.2)
    tw = torch.rand(7, generator=torch.Generator().manual_seed(1))
    kw = dict(logit_scale=1.2, softcap=3.0, z_loss=0.01, token_weight=tw, return_stats=True)

    def step(inp, weight):
        loss, stats = fusedce.linear_cross_entropy(
            inp, weight, t, reduction=reduction, chunk_size=3, **kw
        )
        return loss.sum(), stats.z_loss.sum(), stats.entropy, stats.correct

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    W1, W2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    out_c = compiled(x, W1)
    out_c[0].backward()
    out_e = step(x, W2)
    out_e[0].backward()
    for a, b in zip(out_c, out_e, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(W1.grad, W2.grad)
