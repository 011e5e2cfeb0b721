"""The one-pass extras of ``cross_entropy``: logit_scale, softcap, z_loss, token_weight and
return_stats, against their definitions in float64 (``ce_reference.extras_float64_loss``).

Kernel suite (marker ``kernel``): run through Triton's interpreter and through the torch
fallback. Shapes are small so that the interpreter run stays short.
"""

from __future__ import annotations

import pytest
import torch

import fusedce
from ce_reference import check_extras, make_logits, make_target
from fusedce.cross_entropy_loss import _cross_entropy_op

pytestmark = pytest.mark.kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Each option alone; "stats" is the plain loss with return_stats. The logits are N(0, 3^2).
ALONE = {
    "logit_scale": dict(logit_scale=0.37),  # a temperature above 1: the loss sees smaller logits
    "softcap": dict(softcap=4.0),  # below the logits' range: the cap bends the large ones
    "z_loss": dict(z_loss=0.05),  # large enough that lse**2 moves loss and gradient
    "token_weight": dict(token_weight=True),  # random weights in [0, 2)
    "stats": dict(return_stats=True),
}
ALL = dict(logit_scale=1.7, softcap=6.0, z_loss=0.02, token_weight=True)

SHAPES = [
    (9, 37),  # one tile, several rows per program with a ragged last row block
    (3, 16411),  # a prime above the interpreter's one-tile sizes: the two-sweep path
]


def _target(shape, kind, ignore=0.0):
    return make_target(shape, kind, ignore_frac=ignore if kind == "hard" else 0.0)


# "sum" only differs from "mean" by the scale: the two-sweep shape skips it (interpreter time).
SHAPE_REDUCTIONS = [
    (shape, reduction)
    for shape in SHAPES
    for reduction in ("mean", "sum", "none")
    if shape[1] < 1000 or reduction != "sum"
]


@pytest.mark.parametrize(("shape", "reduction"), SHAPE_REDUCTIONS, ids=str)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("name", list(ALONE))
def test_option_alone(name, kind, reduction, shape):
    o = dict(ALONE[name])
    return_stats = o.pop("return_stats", False)
    x = make_logits(shape, torch.float32)
    check_extras(x, _target(shape, kind, 0.3), reduction=reduction, return_stats=return_stats, **o)


# Every dtype on the one-tile shape; the two-sweep shape in float32 and bfloat16 (the half
# dtypes share their code path).
DTYPE_CASES = [(SHAPES[0], d) for d in DTYPES] + [
    (SHAPES[1], torch.float32),
    (SHAPES[1], torch.bfloat16),
]


@pytest.mark.parametrize(("shape", "dtype"), DTYPE_CASES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_all_options_together(kind, reduction, shape, dtype):
    """Every new option at once, with the stats, in each dtype (float64: the torch backend)."""
    x = make_logits(shape, dtype)
    check_extras(x, _target(shape, kind, 0.3), reduction=reduction, **ALL)


# The existing options, each with all the new ones (ignore_index applies to class indices).
EXISTING = {
    "weight": dict(weight=True),
    "ignore_index": dict(ignore=0.3),
    "label_smoothing": dict(label_smoothing=0.1),
    "full_smoothing": dict(label_smoothing=1.0),
    "weight+ignore+smoothing": dict(weight=True, ignore=0.3, label_smoothing=0.2),
    "custom_ignore_index": dict(ignore_index=3, label_smoothing=0.05),
}
EXISTING_CASES = [
    (name, kind)
    for name, o in EXISTING.items()
    for kind in ("hard", "soft")
    if kind == "hard" or not ({"ignore", "ignore_index"} & o.keys())
]


@pytest.mark.parametrize("return_stats", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("existing", "kind"), EXISTING_CASES, ids=str)
def test_with_existing_options(existing, kind, reduction, return_stats):
    shape = (9, 37)
    o = dict(EXISTING[existing])
    x = make_logits(shape, torch.float32)
    target = make_target(shape, kind, ignore_frac=o.pop("ignore", 0.0))
    if "ignore_index" in o:
        target = torch.where(torch.arange(shape[0]) % 2 == 0, o["ignore_index"], target)
    if o.pop("weight", False):
        o["weight"] = torch.rand(shape[1], generator=torch.Generator().manual_seed(5)) + 0.1
    check_extras(x, target, reduction=reduction, return_stats=return_stats, **o, **ALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_existing_options_two_sweeps(reduction, dtype):
    """Class weights, ignore_index and smoothing with every extra on the two-sweep path."""
    shape = (4, 16411)
    x = make_logits(shape, dtype)
    w = torch.rand(shape[1], generator=torch.Generator().manual_seed(5)) + 0.1
    target = make_target(shape, "hard", ignore_frac=0.3)
    check_extras(x, target, weight=w, label_smoothing=0.1, reduction=reduction, **ALL)


# Edge shapes, each with every option.
EDGE_SHAPES = [
    (5, 1),  # C = 1: softmax is 1, entropy 0, the only class is always the argmax
    (6, 2),  # C = 2: smaller than any tile
    (0, 10),  # N = 0: an empty batch (mean is 0, stats empty)
    (1, 1000),  # N = 1, a non-power-of-two C in one tile
    (13,),  # unbatched (C,) input: target () and a () token weight
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_edge_shapes(shape, kind, reduction):
    x = make_logits(shape, torch.float32)
    check_extras(x, make_target(shape, kind), reduction=reduction, **ALL)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dim(reduction, kind):
    """(N, C, d1, d2) input: token weights and stats have the (N, d1, d2) element shape."""
    shape = (2, 11, 3, 5)
    x = make_logits(shape, torch.float32)
    target = make_target(shape, kind, ignore_frac=0.2 if kind == "hard" else 0.0)
    w = torch.rand(11, generator=torch.Generator().manual_seed(3)) + 0.5
    check_extras(x, target, weight=w, label_smoothing=0.1, reduction=reduction, **ALL)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous(reduction):
    """A transposed (N, C) view and a row-strided slice take the same options."""
    x = make_logits((37, 9), torch.float32).t()
    check_extras(x, make_target((9, 37), "hard", ignore_frac=0.2), reduction=reduction, **ALL)
    x = make_logits((9, 80), torch.float32)[:, ::2]
    check_extras(x, make_target((9, 40), "soft"), reduction=reduction, **ALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward(reduction, dtype):
    """The gradient written into the logits' storage: same numbers with every option."""
    shape = (8, 300)
    x = make_logits(shape, dtype)
    check_extras(x, make_target(shape, "hard", ignore_frac=0.2), reduction=reduction, **ALL)
    check_extras(
        x, make_target(shape, "hard", ignore_frac=0.2), reduction=reduction, inplace=True, **ALL
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_target_gradient(reduction):
    """Probabilities that require grad: d loss / d target through scale, softcap, weights."""
    shape = (6, 23)
    x = make_logits(shape, torch.float32).requires_grad_()
    t = make_target(shape, "soft").requires_grad_()
    tw = torch.rand(6, generator=torch.Generator().manual_seed(4))
    kw = dict(logit_scale=0.8, softcap=5.0, z_loss=0.01, token_weight=tw, label_smoothing=0.1)
    loss = fusedce.cross_entropy(x, t, reduction=reduction, **kw)
    x64, t64 = x.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    from ce_reference import extras_float64_loss

    ref, _ = extras_float64_loss(x64, t64, reduction=reduction, **kw)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(9))
    gx, gt = torch.autograd.grad(loss, (x, t), go)
    rx, rt = torch.autograd.grad(ref, (x64, t64), go.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_softcap_large_logits_stay_finite(dtype):
    """|x| = 1e4 under a softcap: tanh saturates to +-1, loss and gradient stay finite."""
    x = make_logits((4, 50), dtype)
    x[0, 3], x[1, 7], x[2, :] = 1e4, -1e4, -1e4
    x[3, 0] = 1e4
    target = torch.tensor([3, 7, 1, 0])
    loss, stats = check_extras(x, target, softcap=30.0, z_loss=1e-3, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(stats.entropy).all()
    assert bool(stats.correct[0]) and not bool(stats.correct[1])


def test_stats_semantics():
    """correct: first maximum on ties, False where ignored; z_loss 0 without a z-loss."""
    x = torch.zeros(4, 6)
    x[:, 2] = x[:, 5] = 3.0  # a tie: argmax is column 2
    target = torch.tensor([2, 5, -100, 2])
    _, stats = fusedce.cross_entropy(x, target, reduction="sum", return_stats=True)
    assert stats.correct.tolist() == [True, False, False, True]
    assert float(stats.z_loss) == 0.0
    acc = stats.correct.sum() / (target != -100).sum()
    assert float(acc) == pytest.approx(2 / 3)
    # The same stats without a gradient (validation) and with one (training).
    x.requires_grad_()
    _, stats2 = fusedce.cross_entropy(x, target, reduction="sum", return_stats=True)
    assert torch.equal(stats.correct, stats2.correct)
    torch.testing.assert_close(stats.lse, stats2.lse)


def test_defaults_change_nothing():
    """The default options give exactly the loss and gradient of the plain call."""
    x = make_logits((9, 37), torch.float32).requires_grad_()
    t = make_target((9, 37), "hard", ignore_frac=0.2)
    a = fusedce.cross_entropy(x, t, label_smoothing=0.1)
    b, _ = fusedce.cross_entropy(
        x, t, label_smoothing=0.1, logit_scale=1.0, softcap=None, z_loss=0.0, return_stats=True
    )
    c = fusedce.cross_entropy(x, t, label_smoothing=0.1, token_weight=torch.ones(9))
    (ga,) = torch.autograd.grad(a, x)
    (gb,) = torch.autograd.grad(b, x)
    (gc,) = torch.autograd.grad(c, x)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(ga, gc)


def test_zero_token_weights_mean_is_zero():
    x = make_logits((5, 12), torch.float32).requires_grad_()
    loss = fusedce.cross_entropy(x, make_target((5, 12), "hard"), token_weight=torch.zeros(5))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not x.grad.any()


def test_no_grad_matches_grad_path():
    x = make_logits((9, 37), torch.float32)
    t = make_target((9, 37), "hard", ignore_frac=0.2)
    tw = torch.rand(9)
    with torch.no_grad():
        a, sa = fusedce.cross_entropy(x, t, token_weight=tw, return_stats=True, **_no_tw())
    b, sb = fusedce.cross_entropy(
        x.clone().requires_grad_(), t, token_weight=tw, return_stats=True, **_no_tw()
    )
    torch.testing.assert_close(a, b.detach())
    for u, v in zip(sa, sb, strict=True):
        torch.testing.assert_close(u, v)


def _no_tw():
    return {k: v for k, v in ALL.items() if k != "token_weight"}


def test_module_matches_functional():
    w = torch.rand(37, generator=torch.Generator().manual_seed(4)) + 0.5
    kw = dict(logit_scale=0.5, softcap=8.0, z_loss=1e-3)
    mod = fusedce.CrossEntropyLoss(weight=w, reduction="sum", return_stats=True, **kw)
    x, t, tw = make_logits((9, 37), torch.float32), make_target((9, 37), "hard"), torch.rand(9)
    loss, stats = mod(x, t, tw)
    ref, ref_stats = fusedce.cross_entropy(
        x, t, weight=w, reduction="sum", token_weight=tw, return_stats=True, **kw
    )
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(stats.entropy, ref_stats.entropy)
    assert "softcap=8.0" in repr(mod) and "z_loss=0.001" in repr(mod)


# ---------------------------------------------------------------- bad input: clear exceptions

_X, _T = torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"logit_scale": 0.0}, ValueError, "logit_scale must be a float > 0"),
        ({"logit_scale": -1.0}, ValueError, "logit_scale must be a float > 0"),
        ({"logit_scale": float("nan")}, ValueError, "logit_scale"),
        ({"logit_scale": "2"}, TypeError, "logit_scale"),
        ({"softcap": 0.0}, ValueError, "softcap must be a float > 0"),
        ({"softcap": -3.0}, ValueError, "softcap must be a float > 0"),
        ({"softcap": float("inf")}, ValueError, "softcap"),
        ({"z_loss": -1e-4}, ValueError, "z_loss must be a float >= 0"),
        ({"z_loss": True}, TypeError, "z_loss"),
        ({"token_weight": torch.ones(3)}, ValueError, "token_weight must have the per-element"),
        ({"token_weight": torch.ones(4, 5)}, ValueError, "token_weight must have"),
        ({"token_weight": torch.ones(4, dtype=torch.long)}, TypeError, "floating point"),
        ({"token_weight": [1.0, 1.0, 1.0, 1.0]}, TypeError, "token_weight must be a tensor"),
        ({"token_weight": torch.ones(4, device="meta")}, ValueError, "token_weight is on meta"),
        ({"token_weight": torch.tensor([1.0, -1.0, 1, 1])}, ValueError, "negative"),
        ({"token_weight": torch.tensor([1.0, float("nan"), 1, 1])}, ValueError, "non-finite"),
        ({"token_weight": torch.tensor([1.0, float("inf"), 1, 1])}, ValueError, "non-finite"),
        ({"token_weight": torch.ones(4, requires_grad=True)}, RuntimeError, "detach"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fusedce.cross_entropy(_X, _T, **kwargs)


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="softcap"):
        fusedce.CrossEntropyLoss(softcap=0.0)
    with pytest.raises(ValueError, match="z_loss"):
        fusedce.CrossEntropyLoss(z_loss=-1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fusedce.CrossEntropyLoss(logit_scale=0)


# ---------------------------------------------------------------- torch.compile / custom op


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_op_opcheck_with_options(reduction):
    """opcheck of the extended schema: options, token weights and the six stat rows."""
    x = make_logits((6, 19), torch.float32).requires_grad_()
    t = make_target((6, 19), "hard", ignore_frac=0.2)
    tw = torch.rand(6)
    torch.library.opcheck(
        _cross_entropy_op,
        (x, t, None, -100, 0.1, reduction, reduction != "none", 0.7, 5.0, 0.01, tw, True),
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_compile_fullgraph_with_options(kind, reduction):
    """torch.compile(fullgraph=True) with every option and the stats: no graph break, same
    numbers as eager."""
    shape = (6, 19)
    x = make_logits(shape, torch.float32)
    t = make_target(shape, kind)
    tw = torch.rand(6, generator=torch.Generator().manual_seed(1))
    kw = dict(logit_scale=1.3, softcap=5.0, z_loss=0.01, token_weight=tw, return_stats=True)

    def step(inp):
        loss, stats = fusedce.cross_entropy(inp, t, reduction=reduction, **kw)
        return loss.sum(), stats.z_loss.sum(), stats.entropy, stats.correct

    x1 = x.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out_c = compiled(x1)
    out_c[0].backward()
    x2 = x.clone().requires_grad_()
    out_e = step(x2)
    out_e[0].backward()
    for a, b in zip(out_c, out_e, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x1.grad, x2.grad)
