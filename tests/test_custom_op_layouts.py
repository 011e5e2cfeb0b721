"""The four ``fusedce::`` custom ops under any memory layout: their fake (meta) kernels give
exactly the shapes, dtypes and strides of the real ops, the real ops give the same numbers for
any strides, and ``torch.library.opcheck`` passes on transposed and strided inputs;
``torch.compile(fullgraph=True)`` of the public functions with a transposed weight and
non-contiguous inputs gives eager's values and gradients.

Kernel suite (marker ``kernel``): the ops run the Triton kernel under TRITON_INTERPRET=1 and the
torch backend under FUSEDCE_BACKEND=torch; the kernels read only unit-stride rows, so the ops
must lay their inputs out for them. Shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce import core

pytestmark = pytest.mark.kernel

ALL_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)
# The same values stored four ways: contiguous; as the transpose of a contiguous tensor (2-D);
# every other element of a twice-as-wide tensor (no unit stride); the leading columns of a wider
# tensor (unit stride, a row stride larger than the row).
LAYOUTS = ["contiguous", "transposed", "strided", "padded"]
NON_CONTIGUOUS = LAYOUTS[1:]
M, C = 6, 33  # cross_entropy: rows, classes
N, D, V = 10, 8, 13  # linear_cross_entropy: rows, features, classes


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the given layout (1-D tensors take "strided" for every non-contiguous
    layout: they have no transpose, and their leading elements are contiguous)."""
    t = t.detach().contiguous()
    if layout != "contiguous" and t.dim() == 1:
        layout = "strided"
    if layout == "contiguous":
        out = t
    elif layout == "transposed":
        out = t.t().contiguous().t()
    else:
        n = t.shape[-1]
        buf = t.new_zeros(*t.shape[:-1], 2 * n if layout == "strided" else n + 3)
        view = buf[..., ::2] if layout == "strided" else buf[..., :n]
        view.copy_(t)
        out = view
    assert torch.equal(out, t)
    assert layout == "contiguous" or t.numel() <= 1 or not out.is_contiguous()
    return out


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _meta(t):
    return (tuple(t.shape), t.dtype, tuple(t.stride())) if isinstance(t, torch.Tensor) else t


def fake_matches_real(op, args, kwargs=None):
    """opcheck's fake-tensor test (every output's shape, dtype and strides, the significant
    ones), and the exact strides of every output compared directly too."""
    kwargs = kwargs or {}
    torch.library.opcheck(op, args, kwargs, test_utils=("test_faketensor",))
    real = op(*args, **kwargs)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args, **kwargs)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [_meta(r) for r in real] == [_meta(f) for f in fake]
    assert all(r.is_contiguous() for r in real)
    return real


# --------------------------------------------------------------------------------------------
# fusedce::cross_entropy and fusedce::cross_entropy_grad
# --------------------------------------------------------------------------------------------


def ce_args(layout, kind, reduction, extras, grad_now, requires_grad=False):
    """Arguments of fusedce::cross_entropy, every tensor in ``layout``; ``extras`` turns on
    class and token weights, the logit transforms, the z-loss and the six stat rows."""
    g = _gen(0)
    x = relayout(torch.randn(M, C, generator=g) * 3, layout).requires_grad_(requires_grad)
    if kind == "hard":
        t = torch.randint(0, C, (M,), generator=g)
        t[1] = -100
    else:
        t = torch.softmax(torch.randn(M, C, generator=g), dim=1)
    t = relayout(t, layout)
    w = relayout(torch.rand(C, generator=g) + 0.5, layout) if extras else None
    tw = relayout(torch.rand(M, generator=g), layout) if extras else None
    ignore = -100 if kind == "hard" else -1
    options = (0.7, 5.0, 0.01, tw, True) if extras else (1.0, None, 0.0, None, False)
    return (x, t, w, ignore, 0.1, reduction, grad_now, *options)


def ce_grad_args(layout, kind, extras, requires_grad=False):
    """Arguments of fusedce::cross_entropy_grad: the stats of a forward with reduction="none"
    and one upstream factor per row, each in ``layout``."""
    fwd = ce_args("contiguous", kind, "none", extras, False)
    stats = torch.ops.fusedce.cross_entropy(*fwd)[2]
    args = ce_args(layout, kind, "none", extras, False, requires_grad)
    x, t, w, ignore, ls = args[:5]
    row_factor = relayout(torch.randn(M, generator=_gen(5)), layout)
    options = args[7:11]
    return (x, t, w, relayout(stats, layout), row_factor, ignore, ls, *options)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize(
    ("reduction", "grad_now"), [("mean", True), ("sum", False), ("none", False)]
)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "extras"])
def test_cross_entropy_op_fake_matches_real(layout, kind, reduction, grad_now, extras):
    op = torch.ops.fusedce.cross_entropy.default
    out = fake_matches_real(op, ce_args(layout, kind, reduction, extras, grad_now))
    assert out[2].shape[0] == (core.EXTRA_STAT_ROWS if extras else core.STAT_ROWS)
    # The same numbers as from contiguous inputs: the op lays the inputs out for the kernels.
    ref = op(*ce_args("contiguous", kind, reduction, extras, grad_now))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "extras"])
def test_cross_entropy_grad_op_fake_matches_real(layout, kind, extras):
    op = torch.ops.fusedce.cross_entropy_grad.default
    (out,) = fake_matches_real(op, ce_grad_args(layout, kind, extras))
    torch.testing.assert_close(out, op(*ce_grad_args("contiguous", kind, extras)))


# --------------------------------------------------------------------------------------------
# fusedce::linear_cross_entropy and fusedce::linear_cross_entropy_backward
# --------------------------------------------------------------------------------------------


def lce_args(layout, bias, reduction, extras, needs, requires_grad=False):
    """Arguments of fusedce::linear_cross_entropy, every tensor in ``layout`` (a transposed
    weight is a tied embedding's ``E.t()``)."""
    g = _gen(1)
    x = relayout(torch.randn(N, D, generator=g), layout).requires_grad_(requires_grad)
    W = relayout(torch.randn(V, D, generator=g) * 0.5, layout).requires_grad_(requires_grad)
    b = relayout(torch.randn(V, generator=g), layout).requires_grad_(requires_grad)
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100
    t = relayout(t, layout)
    w = relayout(torch.rand(V, generator=g) + 0.5, layout) if extras else None
    tw = relayout(torch.rand(N, generator=g), layout) if extras else None
    options = (0.8, 3.0, 0.01, tw, True) if extras else (1.0, None, 0.0, None, False)
    b = b if bias else None
    return (x, W, b, t, w, -100, 0.1, reduction, 4, "float32", list(needs), *options)


def lce_backward_args(layout, bias, extras, needs, requires_grad=False):
    args = lce_args(layout, bias, "none", extras, needs, requires_grad)
    grad_output = relayout(torch.randn(N, generator=_gen(6)), layout)
    return (grad_output, *args[:7], *args[8:15])


NEEDS = {"all": (True, True, True), "weight": (False, True, False), "none": (False,) * 3}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("extras", "needs"),
    [(False, "all"), (True, "all"), (False, "weight"), (True, "none")],
    ids=["plain-all", "extras-all", "plain-weight", "extras-none"],
)
def test_linear_op_fake_matches_real(layout, bias, reduction, extras, needs):
    op = torch.ops.fusedce.linear_cross_entropy.default
    out = fake_matches_real(op, lce_args(layout, bias, reduction, extras, NEEDS[needs]))
    assert out[4].shape[0] == (core.EXTRA_STAT_ROWS if extras else core.STAT_ROWS)
    ref = op(*lce_args("contiguous", bias, reduction, extras, NEEDS[needs]))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "extras"])
def test_linear_backward_op_fake_matches_real(layout, bias, extras):
    op = torch.ops.fusedce.linear_cross_entropy_backward.default
    out = fake_matches_real(op, lce_backward_args(layout, bias, extras, NEEDS["all"]))
    ref = op(*lce_backward_args("contiguous", bias, extras, NEEDS["all"]))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# opcheck: every test util on transposed and strided inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_cross_entropy(layout, kind, reduction):
    args = ce_args(layout, kind, reduction, kind == "soft", reduction != "none", True)
    if kind == "soft":
        args[1].requires_grad_()  # the probabilities' gradient too
    torch.library.opcheck(torch.ops.fusedce.cross_entropy.default, args, test_utils=ALL_UTILS)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_linear_cross_entropy(layout, bias, reduction):
    args = lce_args(layout, bias, reduction, bias, NEEDS["all"], True)
    torch.library.opcheck(
        torch.ops.fusedce.linear_cross_entropy.default, args, test_utils=ALL_UTILS
    )


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("op", ["cross_entropy_grad", "linear_cross_entropy_backward"])
def test_opcheck_backward_ops(layout, op):
    """The backward ops: every util, test_aot_dispatch_dynamic on inputs that need no gradient.

    These ops ARE the backward of the forward ops and fusedce does not support double backward
    (``no_double_backward``): they have no autograd formula, so test_aot_dispatch_dynamic's
    gradient half (a backward through them) does not apply. Its forward half (the op traced by
    AOTAutograd with dynamic shapes against eager) runs on detached inputs."""
    if op == "cross_entropy_grad":
        make = lambda grad: ce_grad_args(layout, "hard", True, grad)
    else:
        make = lambda grad: lce_backward_args(layout, True, True, NEEDS["all"], grad)
    target = getattr(torch.ops.fusedce, op).default
    utils = [u for u in ALL_UTILS if u != "test_aot_dispatch_dynamic"]
    torch.library.opcheck(target, make(True), test_utils=utils)
    torch.library.opcheck(target, make(False), test_utils=("test_aot_dispatch_dynamic",))


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public functions
# --------------------------------------------------------------------------------------------

# aot_eager: the graph runs the real ops (values and gradients against eager);
# aot_eager_decomp_partition_crossref also runs every custom op's fake kernel beside the real
# one and raises on any shape, dtype or stride mismatch (what Inductor's stride asserts catch,
# without compiling C++).
BACKENDS = ["aot_eager", "aot_eager_decomp_partition_crossref"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_linear_cross_entropy_transposed_weight(backend, reduction):
    """A tied embedding's transposed weight, a strided (B, T, D) input and a strided bias."""
    torch._dynamo.reset()
    g = _gen(2)
    E = torch.randn(D, V, generator=g).mul_(0.5).requires_grad_()  # (D, V): W = E.t()
    b = relayout(torch.randn(V, generator=g), "strided").requires_grad_()
    h = relayout(torch.randn(2, 5, D, generator=g), "strided").requires_grad_()
    t = torch.randint(0, V, (2, 5), generator=g)
    t[0, 1] = -100
    up = torch.randn(2, 5, generator=g) if reduction == "none" else torch.tensor(1.3)

    def step(h, W, b):
        loss, stats = fusedce.linear_cross_entropy(
            h, W, t, linear_bias=b, reduction=reduction, chunk_size=3, return_stats=True
        )
        return loss, stats.lse

    W = E.t()
    assert not W.is_contiguous()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out_c = compiled(h, W, b)
    grads_c = torch.autograd.grad(out_c[0], (h, E, b), up)
    out_e = step(h, W, b)
    grads_e = torch.autograd.grad(out_e[0], (h, E, b), up)
    for a, e in zip((*out_c, *grads_c), (*out_e, *grads_e), strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("shape", [(2, C, 3), (C,)], ids=["k-dim", "1-d"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_cross_entropy_non_contiguous(shape, reduction):
    """K-dim input (its class dimension moved last: strided rows) and 1-D input, under the
    fake-checking backend, with the stats."""
    torch._dynamo.reset()
    g = _gen(3)
    x = relayout(torch.randn(shape, generator=g) * 2, "strided").requires_grad_()
    tshape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    t = torch.randint(0, C, tshape, generator=g)

    def step(x):
        loss, stats = fusedce.cross_entropy(x, t, reduction=reduction, return_stats=True)
        return loss.sum(), stats.entropy

    compiled = torch.compile(step, fullgraph=True, backend=BACKENDS[1])
    out_c = compiled(x)
    (gc,) = torch.autograd.grad(out_c[0], x)
    out_e = step(x)
    (ge,) = torch.autograd.grad(out_e[0], x)
    for a, e in zip((*out_c, gc), (*out_e, ge), strict=True):
        torch.testing.assert_close(a, e)
