"""fusedce.cross_entropy against torch's F.cross_entropy in float64, loss and gradient.

This whole module is the kernel suite (marker ``kernel``). CI runs it twice: with
TRITON_INTERPRET=1 the CPU tensors go through the Triton kernel in Triton's interpreter; without
it they go through the torch fallback. ``test_dispatch_matches_mode`` pins which path ran.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedce
from ce_reference import DTYPES, check, make_logits, make_target, reference
from fusedce import uses_triton

pytestmark = pytest.mark.kernel


def test_dispatch_matches_mode():
    """Which implementation this run exercises: the interpreter run must really use Triton."""
    x = torch.zeros(2, 3)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert uses_triton(x)
    else:
        assert not uses_triton(x)
    assert not uses_triton(x.double())  # float64 always takes the fallback


# (N, C) shapes, each there to break something:
SHAPES = [
    (7, 1),  # C = 1: softmax is 1, the loss is 0 and the gradient only smoothing's
    (7, 2),  # C = 2: smaller than any tile
    (5, 3),  # C = 3: odd, far from a power of two
    (1, 1000),  # N = 1 and a non-power-of-two C in one tile
    (3, 16411),  # a prime above the largest one-tile size: the two-sweep path with a ragged end
    (2, 50257),  # a large non-power-of-two vocabulary (GPT-2's): many tiles
    (0, 10),  # N = 0: empty batch
    (33, 7),  # several rows per program with a ragged last program
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hard_targets(shape, dtype, reduction):
    x = make_logits(shape, dtype)
    check(x, make_target(shape, "hard"), reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_targets(shape, dtype, reduction):
    x = make_logits(shape, dtype)
    check(x, make_target(shape, "soft"), reduction=reduction)


# Every argument alone and all together, on a one-tile and a multi-tile shape.
OPTION_SETS = {
    "weight": dict(weight=True),
    "ignore_index": dict(ignore=0.3),
    "label_smoothing": dict(label_smoothing=0.1),
    "full_smoothing": dict(label_smoothing=1.0),
    "weight+ignore": dict(weight=True, ignore=0.3),
    "weight+ignore+smoothing": dict(weight=True, ignore=0.3, label_smoothing=0.2),
    "custom_ignore_index": dict(ignore_index=3, label_smoothing=0.05),
}


# ignore_index applies to class indices only (torch raises for probabilities).
OPTION_CASES = [
    (name, kind)
    for name, o in OPTION_SETS.items()
    for kind in ("hard", "soft")
    if kind == "hard" or not ({"ignore", "ignore_index"} & o.keys())
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(9, 37), (3, 16411)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("opts", "kind"), OPTION_CASES, ids=str)
def test_options(opts, kind, reduction, shape, dtype):
    o = dict(OPTION_SETS[opts])
    x = make_logits(shape, dtype)
    target = make_target(shape, kind, ignore_frac=o.pop("ignore", 0.0))
    if "ignore_index" in o:
        target = torch.where(torch.arange(shape[0]) % 2 == 0, o["ignore_index"], target)
    if o.pop("weight", False):
        o["weight"] = torch.rand(shape[1], generator=torch.Generator().manual_seed(5)) + 0.1
    check(x, target, reduction=reduction, **o)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dim(dtype, kind, reduction):
    """(N, C, d1, d2): the class dimension is 1, as in torch (segmentation-style inputs)."""
    shape = (2, 11, 3, 5)
    x = make_logits(shape, dtype)
    w = torch.rand(11) + 0.5
    check(
        x,
        make_target(shape, kind, ignore_frac=0.2 if kind == "hard" else 0.0),
        weight=w,
        reduction=reduction,
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_sample(dtype):
    """input (C,), target () or (C,): torch's unbatched form."""
    x = make_logits((13,), dtype)
    check(x, make_target((13,), "hard"), reduction="none")
    check(x, make_target((13,), "soft"), reduction="mean", label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layout", ["column_stride", "row_slice", "transposed", "soft_target_transposed"]
)
def test_non_contiguous(dtype, layout):
    base = make_logits((10, 6000), dtype)
    if layout == "column_stride":
        x = base[:, ::3]  # stride along C is 3: copied to unit stride
    elif layout == "row_slice":
        x = base[::2, 1:4001]  # unit stride along C, row stride 12000: read in place
    else:
        x = make_logits((300, 10), dtype).t()  # (10, 300) with stride (1, 10)
    assert not x.is_contiguous()
    if layout == "soft_target_transposed":
        target = make_target((300, 10), "soft").t()
    else:
        target = make_target(tuple(x.shape), "hard", ignore_frac=0.2)[::1]
    check(x, target, label_smoothing=0.1, reduction="none")


def test_int32_targets():
    x = make_logits((9, 37), torch.float32)
    check(x, make_target((9, 37), "hard", dtype=torch.int32), reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(reduction):
    """Documented deviation: a mean over nothing is 0 with a zero gradient (torch: NaN)."""
    x = make_logits((4, 9), torch.float32).requires_grad_()
    target = torch.full((4,), -100)
    loss = fusedce.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    assert torch.all(loss == 0)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.all(g == 0)


def test_empty_batch_mean_is_zero():
    x = torch.zeros(0, 5, requires_grad=True)
    loss = fusedce.cross_entropy(x, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert g.shape == (0, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_are_stable(dtype):
    """Logits of magnitude 1e4: exp() would overflow without the running max."""
    x = make_logits((6, 5000), torch.float32, scale=1.0)
    x[:, 17] = 1e4
    x[:, 400] = -1e4
    x[1, 300] = 1e4 - 1.5
    x = x.to(dtype)
    target = torch.tensor([17, 300, 400, 0, 17, 4999])
    # In float32, x - lse near 1e4 carries an absolute error of ~1e-3 (one ulp of 1e4), as in
    # torch's own float32 computation: finite results with a looser tolerance.
    loss = check(x, target, reduction="none", label_smoothing=0.1, rtol_scale=100.0)
    assert torch.isfinite(loss).all()


def test_neg_inf_logits():
    """-inf logits (masked vocabulary): finite loss and gradient where torch's are finite."""
    x = make_logits((4, 300), torch.float32)
    x[:, 100:] = float("-inf")
    target = torch.tensor([0, 5, 99, -100])
    check(x, target, reduction="mean")
    # Probabilities that are 0 exactly where the logits are -inf: 0 * log 0 = 0 (torch: NaN).
    p = torch.zeros(4, 300)
    p[:, :100] = torch.softmax(torch.randn(4, 100), dim=1)
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, p)
    expected = -(p[:, :100] * torch.log_softmax(x[:, :100].double(), 1)).sum(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, xr)
    assert torch.isfinite(g).all() and torch.all(g[:, 100:] == 0)


def test_nan_logits_propagate():
    x = make_logits((3, 50), torch.float32)
    x[1, 7] = float("nan")
    loss = fusedce.cross_entropy(x, torch.tensor([1, 2, 3]), reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(fusedce.cross_entropy(x, torch.tensor([1, 2, 3])))


def test_no_grad_path_matches():
    """Validation steps: no gradient requested, the kernel writes none; same loss."""
    x = make_logits((9, 37), torch.float32)
    target = make_target((9, 37), "hard", ignore_frac=0.2)
    with torch.no_grad():
        a = fusedce.cross_entropy(x.requires_grad_(), target, label_smoothing=0.1)
    b = fusedce.cross_entropy(x.detach(), target, label_smoothing=0.1)
    _, ref = reference(x, target, label_smoothing=0.1)
    assert not a.requires_grad
    torch.testing.assert_close(a.double(), ref.detach())
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(dtype):
    """The gradient lands in the logits' storage; its values equal the out-of-place gradient."""
    x = make_logits((8, 3000), dtype)
    target = make_target((8, 3000), "hard", ignore_frac=0.2)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as the output of a layer would be
    loss = fusedce.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True)
    ptr = logits.data_ptr()
    loss.backward(torch.tensor(2.0))
    leaf2 = x.clone().requires_grad_()
    ref_loss = fusedce.cross_entropy(leaf2 * 1.0, target, label_smoothing=0.1)
    ref_loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(leaf.grad, leaf2.grad)
    torch.testing.assert_close(logits.detach(), leaf.grad)  # the storage now holds the gradient
    assert logits.data_ptr() == ptr


def test_inplace_backward_is_caught_when_logits_were_saved():
    """Overwriting logits that another op saved for backward must raise, not corrupt."""
    x = make_logits((4, 20), torch.float32).requires_grad_()
    logits = torch.sigmoid(x)  # sigmoid saves its output for backward
    loss = fusedce.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_second_backward_raises():
    """On the row contract (small plain CPU calls on the default backend are torch's own
    operator, where a second backward works)."""
    x = make_logits((4, 20), torch.float32).requires_grad_()
    with fusedce.use_backend(fusedce.get_backend() if fusedce.uses_triton(x) else "torch"):
        loss = fusedce.cross_entropy(x, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("g", [1.0, 0.0, -3.5])
def test_grad_output_scalar_values(g):
    """grad_output of exactly 1 skips the scaling pass; other values must still scale."""
    x = make_logits((5, 70), torch.float32).requires_grad_()
    target = make_target((5, 70), "hard")
    loss = fusedce.cross_entropy(x, target)
    (gx,) = torch.autograd.grad(loss, x, torch.tensor(g))
    x64, ref = reference(x, target)
    (gref,) = torch.autograd.grad(ref, x64, torch.tensor(g, dtype=torch.float64))
    torch.testing.assert_close(gx.double(), gref, rtol=1e-5, atol=1e-7)


def test_module_matches_functional_and_torch_module():
    w = torch.rand(37, generator=torch.Generator().manual_seed(4)) + 0.5
    ours = fusedce.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(
        weight=w.double(), ignore_index=2, reduction="sum", label_smoothing=0.1
    )
    x = make_logits((9, 37), torch.float32)
    t = make_target((9, 37), "hard")
    # float32 loss: a sum of 9 rows in float32 against float64
    torch.testing.assert_close(ours(x, t).double(), theirs(x.double(), t), rtol=1e-6, atol=1e-6)
    assert "label_smoothing=0.1" in repr(ours)
    assert "weight" in dict(ours.named_buffers())  # moves with .to(device)


def test_autocast_loss_is_float32():
    """Under autocast the loss is float32 (as torch's) and the gradient the logits' dtype."""
    lin = torch.nn.Linear(8, 40)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        loss = fusedce.cross_entropy(logits, torch.randint(0, 40, (6,)))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------- bad input: clear exceptions


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (((4, 5), torch.tensor([0, 1, 5, 2])), {}, IndexError, "out of bounds for 5 classes"),
        (((4, 5), torch.tensor([0, 1, -1, 2])), {}, IndexError, "index -1 is out of bounds"),
        (((4, 5), torch.tensor([0, 1, 2])), {}, ValueError, "does not fit input"),
        (((4, 5), torch.zeros(4, 5, dtype=torch.long)), {}, TypeError, "probabilities"),
        (((4, 5), torch.zeros(4)), {}, TypeError, "int64, int32 or uint8"),
        (
            ((4, 5), torch.zeros(4, dtype=torch.long)),
            {"weight": torch.ones(4)},
            ValueError,
            "1-D tensor of 5 class weights",
        ),
        (
            ((4, 5), torch.zeros(4, dtype=torch.long)),
            {"reduction": "avg"},
            ValueError,
            "reduction must be one of",
        ),
        (
            ((4, 5), torch.zeros(4, dtype=torch.long)),
            {"label_smoothing": 1.5},
            ValueError,
            "label_smoothing must be in",
        ),
        (
            ((4, 5), torch.zeros(4, dtype=torch.long)),
            {"label_smoothing": -0.1},
            ValueError,
            "label_smoothing must be in",
        ),
        (((4, 5), torch.rand(4, 5)), {"ignore_index": 1}, ValueError, "ignore_index"),
        (((4, 0), torch.zeros(4, dtype=torch.long)), {}, ValueError, "0 classes"),
    ],
)
def test_bad_input_raises(args, kwargs, exc, match):
    shape, target = args
    x = torch.randn(shape, requires_grad=True)
    with pytest.raises(exc, match=match):
        fusedce.cross_entropy(x, target, **kwargs)


def test_bad_input_dtype_raises():
    with pytest.raises(TypeError, match="floating"):
        fusedce.cross_entropy(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_target_check_can_be_disabled_and_then_gives_nan():
    """With the range check off a bad index still reads nothing out of bounds: its row is NaN."""
    fusedce.set_target_check(False)
    try:
        x = make_logits((3, 6), torch.float32).requires_grad_()
        loss = fusedce.cross_entropy(x, torch.tensor([0, 9, 2]), reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2]]).all()
    finally:
        fusedce.set_target_check(True)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        fusedce.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fusedce.CrossEntropyLoss(label_smoothing=2.0)


def test_float64_uses_fallback_in_float64():
    x = make_logits((5, 40), torch.float64)
    check(x, make_target((5, 40), "hard", ignore_frac=0.2), label_smoothing=0.3)


# ---------------------------------------------------------------- torch.compile / custom op


def test_custom_op_passes_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration agree."""
    x = make_logits((6, 33), torch.float32)
    t = make_target((6, 33), "hard", ignore_frac=0.2)
    w = torch.rand(33) + 0.5
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.fusedce.cross_entropy.default,
            (x.requires_grad_(), t, w, -100, 0.1, reduction, True),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_compile_fullgraph(kind):
    """torch.compile(fullgraph=True) traces through the custom op: no graph break, same numbers."""
    torch._dynamo.reset()
    model = torch.nn.Linear(16, 29)
    x = torch.randn(10, 16)
    target = make_target((10, 29), kind)

    def step(inp):
        return fusedce.cross_entropy(model(inp), target, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x)
    (gc,) = torch.autograd.grad(loss_c, model.weight)
    loss_e = step(x)
    (ge,) = torch.autograd.grad(loss_e, model.weight)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gc, ge)
    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0


# Slow: tests/test_compile_float_options.py compiles cross_entropy with Inductor too (z-loss
# cases), against eager, loss and gradient.
@pytest.mark.slow
def test_compile_inductor():
    """The real inductor backend (C++ codegen on CPU) around the custom op."""
    torch._dynamo.reset()
    model = torch.nn.Linear(16, 29)
    x = torch.randn(10, 16)
    target = make_target((10, 29), "hard", ignore_frac=0.2)
    compiled = torch.compile(
        lambda inp: fusedce.cross_entropy(model(inp), target, reduction="none").sum() * 0.5,
        fullgraph=True,
    )
    loss = compiled(x)
    loss.backward()
    ref = F.cross_entropy(model(x).double(), target, reduction="none").sum() * 0.5
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert math.isfinite(model.weight.grad.norm().item())


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_many_rows_path(monkeypatch, kind, reduction):
    """Past ONE_PROGRAM_ROWS the Triton backend's scale, index check and final sum come from
    torch reductions instead of the one-program kernels; same numbers (the limit is lowered to
    reach it here)."""
    kernels = sys.modules.get("fusedce.backends.triton_kernels")  # absent without Triton
    if kernels is not None:
        monkeypatch.setattr(kernels, "ONE_PROGRAM_ROWS", 4)
    x = make_logits((33, 300), torch.bfloat16)
    target = make_target((33, 300), kind, ignore_frac=0.3 if kind == "hard" else 0.0)
    weight = torch.rand(300, generator=torch.Generator().manual_seed(3)) + 0.5
    check(x, target, reduction=reduction, weight=weight, label_smoothing=0.1)
    if kind == "hard":
        bad = target.clone()
        bad[7] = 300
        with pytest.raises(IndexError, match="300 is out of bounds"):
            fusedce.cross_entropy(x, bad)
