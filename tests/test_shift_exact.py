"""Shift-exact numerics: cross-entropy ignores a common offset of the logits, as torch's does.

``log_softmax(x + c) == log_softmax(x)``: an implementation that forms lse = m + log(sum) and
subtracts x_y (or x) from it loses every digit once |c| is large (float32 spacing at 1e8 is 8).
Every path computes from the row max instead; these tests hold each to torch's own float32
error on the same input, against float64 on upcast copies (which is exact here: float32
values near a large offset differ by exactly representable amounts).

Kernel suite (marker ``kernel``): through Triton's interpreter and the torch backend (its eager
rows, its Inductor-compiled rows above ``MIN_BLOCK_LOGITS`` and its general path for options).
The small-call shortcut and the eager rows with compilation off run in the default suite.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusedce
from ce_reference import extras_float64_loss
from fusedce.backends.cpu_compiled import cpu_compile_enabled

FP32_OFFSETS = [0.0, 1e3, 1e6, 1e8, 1e30, 3e38]
# (shape, why): one tile with ragged row blocks; a prime above the interpreter's one-tile size
# (two sweeps: the running max moves between tiles); many rows, so that the torch backend takes
# its compiled rows (>= 32768 logits).
SHAPES = [(16, 37), (3, 16411), (40, 1031)]


def _logits(shape, offset, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
    # Descending offsets across the row: the two-sweep path sees its running max move.
    ramp = torch.linspace(0.0, -8.0, shape[-1], dtype=torch.float64)
    return (x + ramp + offset).to(dtype)


def _torch_error(fn32, ref) -> float:
    """|torch's float32 result - the float64 reference|: the error torch itself makes (0 where
    torch's float32 overflows, e.g. lse**2 of 1e30)."""
    err = float((fn32.detach().double() - ref).abs().max())
    return err if math.isfinite(err) else 0.0


def _assert_loss_close(got, ref, torch_err, eps):
    bound = 2.0 * torch_err + 8.0 * eps * float(ref.abs().max()) + 1e-6
    err = float((got.detach().double() - ref).abs().max())
    assert err <= bound, (err, bound, torch_err)


def _assert_rows_sum_to_zero(g, g_torch, eps):
    """The gradient of softmax - onehot sums to 0 per row, up to rounding: each element's (eps
    times sum |g|) and the normaliser's, which torch's own float32 gradient ``g_torch`` shows."""
    g = g.double()
    torch_sums = g_torch.double().sum(1).abs()
    bound = 4.0 * eps * g.abs().sum(1) + 2.0 * torch_sums + 1e-12
    assert bool((g.sum(1).abs() <= bound).all()), float(g.sum(1).abs().max())


def _check_plain(x, y, **kw):
    x = x.detach().requires_grad_()
    loss = fusedce.cross_entropy(x, y, **kw)
    up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(9)) + 0.5
    (g,) = torch.autograd.grad(loss, x, up)
    x64 = x.detach().double().requires_grad_()
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref = F.cross_entropy(x64, y, **kw64)
    (g64,) = torch.autograd.grad(ref, x64, up.double())
    x32 = x.detach().float().requires_grad_()
    torch32 = F.cross_entropy(x32, y, **kw)
    (g32,) = torch.autograd.grad(torch32, x32, up)
    eps = torch.finfo(x.dtype).eps
    _assert_loss_close(loss, ref.detach(), _torch_error(torch32.detach(), ref.detach()), eps)
    # Gradient: no worse than torch's float32 gradient rounded to the input's dtype.
    torch_gerr = float((g32.to(x.dtype).double() - g64).norm())
    err = float((g.double() - g64).norm())
    assert err <= 2.0 * torch_gerr + 4.0 * eps * float(g64.norm()) + 1e-7, (err, torch_gerr)
    if not kw.get("label_smoothing") and kw.get("weight") is None and loss.dim() == 0:
        _assert_rows_sum_to_zero(g, g32, eps)
    return loss, g


@pytest.mark.kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", FP32_OFFSETS)
def test_offsets_float32(offset, shape):
    x = _logits(shape, offset)
    y = torch.randint(shape[1], (shape[0],), generator=torch.Generator().manual_seed(1))
    y[::5] = -100  # ignored rows: zero gradient whatever the offset
    _, g = _check_plain(x, y)
    assert bool((g[::5] == 0).all())


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("dtype", "offset"),
    [(torch.float16, 6e4), (torch.float16, -6e4), (torch.bfloat16, 1e30), (torch.bfloat16, -1e8)],
    ids=str,
)
def test_offsets_half(dtype, offset):
    shape = (16, 37)
    x = _logits(shape, offset, dtype)
    y = torch.randint(shape[1], (shape[0],), generator=torch.Generator().manual_seed(1))
    _check_plain(x, y)


@pytest.mark.kernel
@pytest.mark.parametrize("offset", [1e8, 1e30])
@pytest.mark.parametrize(
    "kw",
    [
        dict(label_smoothing=0.1),
        dict(weight=True),
        dict(reduction="none"),
        dict(reduction="sum", label_smoothing=0.3, weight=True),
    ],
    ids=str,
)
def test_offsets_options(offset, kw):
    """Smoothing and class weights (the general path: sum_c b_c (x_c - m) moved with the max)."""
    shape = (5, 16411)  # two sweeps in the interpreter
    x = _logits(shape, offset)
    y = torch.randint(shape[1], (shape[0],), generator=torch.Generator().manual_seed(1))
    if kw.get("weight") is True:
        kw = dict(kw, weight=torch.rand(shape[1], generator=torch.Generator().manual_seed(3)))
    _check_plain(x, y, **kw)


@pytest.mark.kernel
@pytest.mark.parametrize("offset", [1e8, -1e30])
def test_offsets_probability_targets(offset):
    shape = (6, 16411)
    x = _logits(shape, offset).requires_grad_()
    t = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(4)), 1)
    t.requires_grad_()
    loss = fusedce.cross_entropy(x, t, label_smoothing=0.05)
    gx, gt = torch.autograd.grad(loss, (x, t))
    x64, t64 = x.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t64, label_smoothing=0.05)
    rx, rt = torch.autograd.grad(ref, (x64, t64))
    x32, t32 = x.detach().requires_grad_(), t.detach().requires_grad_()
    torch32 = F.cross_entropy(x32, t32, label_smoothing=0.05)
    eps = torch.finfo(torch.float32).eps
    _assert_loss_close(loss, ref.detach(), _torch_error(torch32.detach(), ref.detach()), eps)
    assert float((gx.double() - rx).norm()) <= 1e-5 * float(rx.norm())
    # d loss / d t = -(1 - eps) log softmax(x): shift-exact too (its values are O(log V)).
    assert float((gt.double() - rt).norm()) <= 1e-5 * float(rt.norm())


@pytest.mark.kernel
@pytest.mark.parametrize("V", [6, 16411])
def test_ties_at_huge_offsets(V):
    """Three logits tie at +1e30, the rest sit at -1e30: softmax is (1/3, 1/3, 1/3, 0, ...)."""
    x = torch.full((4, V), -1e30)
    x[:, :3] = 1e30
    x.requires_grad_()
    y = torch.tensor([0, 1, 2, 5])
    loss = fusedce.cross_entropy(x, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    expected = torch.zeros(4, V)
    expected[:, :3] = 1.0 / 3.0
    expected[torch.arange(4), y] -= 1.0
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-7)
    # Rows 0-2 pay log 3 each; row 3's class sits 2e30 below the maximum.
    assert abs(float(loss) - 2e30) / 2e30 < 1e-6
    per_row = fusedce.cross_entropy(x.detach()[:3], y[:3], reduction="none")
    torch.testing.assert_close(per_row, torch.full((3,), torch.log(torch.tensor(3.0)).item()))


EXTRAS = [
    dict(logit_scale=0.5),
    dict(softcap=30.0),
    dict(z_loss=1e-4),
    dict(token_weight=True),
    dict(logit_scale=2.0, z_loss=1e-4, token_weight=True),
]


@pytest.mark.kernel
@pytest.mark.parametrize("offset", [1e3, 1e8, 1e30])
@pytest.mark.parametrize("extras", EXTRAS, ids=str)
def test_offsets_extras(extras, offset):
    """Every extra and return_stats, within torch's float32 error of the same formula."""
    shape = (5, 16411)
    kw = dict(extras)
    if kw.get("token_weight") is True:
        kw["token_weight"] = torch.rand(shape[0], generator=torch.Generator().manual_seed(5))
    if kw.get("z_loss") and offset > 1e20:
        kw["z_loss"] = 1e-70  # lse**2 overflows float32 here; keep the term in range
    x = _logits(shape, offset).requires_grad_()
    y = torch.randint(shape[1], (shape[0],), generator=torch.Generator().manual_seed(1))
    loss, stats = fusedce.cross_entropy(x, y, return_stats=True, **kw)
    (g,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    ref, ref_stats = extras_float64_loss(x64, y, **kw)
    (g64,) = torch.autograd.grad(ref, x64)
    x32 = x.detach().requires_grad_()
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    torch32, stats32 = extras_float64_loss(x32, y, **kw32)
    (g32,) = torch.autograd.grad(torch32, x32)
    eps = torch.finfo(torch.float32).eps
    _assert_loss_close(loss, ref.detach(), _torch_error(torch32.detach(), ref.detach()), eps)
    for name in ("lse", "entropy"):
        got, want = getattr(stats, name), ref_stats[name]
        _assert_loss_close(got, want, _torch_error(stats32[name], want), eps)
    torch_gerr = float((g32.double() - g64).norm())
    err = float((g.double() - g64).norm())
    assert err <= 2.0 * torch_gerr + 8.0 * eps * float(g64.norm()) + 1e-7, (err, torch_gerr)


@pytest.mark.kernel
@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_offsets_fused_head(offset):
    """linear_cross_entropy with a large common offset in the bias, in chunks of rows."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 24, 16, 1031
    h = torch.randn(N, D, generator=g).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    b = torch.full((V,), offset).requires_grad_()
    y = torch.randint(V, (N,), generator=g)
    loss = fusedce.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=7)
    grads = torch.autograd.grad(loss, (h, W, b))
    leaves64 = [t.detach().double().requires_grad_() for t in (h, W, b)]
    # The float32 logits round to the offset's spacing: that rounding is part of the input, so
    # the reference is float64 cross-entropy of the float32 logits.
    logits32 = F.linear(h.detach(), W.detach(), b.detach())
    ref = F.cross_entropy(logits32.double(), y)
    torch32 = F.cross_entropy(logits32, y)
    eps = torch.finfo(torch.float32).eps
    _assert_loss_close(loss, ref, _torch_error(torch32, ref), eps)
    # The softmax - onehot behind every gradient sums to 0 per row: so does grad_b's total.
    assert abs(float(grads[2].sum())) <= 1e-4
    logits64 = F.linear(*leaves64)
    ref64 = F.cross_entropy(logits64, y)
    ref_grads = torch.autograd.grad(ref64, leaves64)
    leaves32 = [t.detach().requires_grad_() for t in (h, W, b)]
    torch_grads = torch.autograd.grad(F.cross_entropy(F.linear(*leaves32), y), leaves32)
    for got, want, t32, name in zip(
        grads, ref_grads, torch_grads, ("input", "weight", "bias"), strict=True
    ):
        # float32 logits are quantised at the offset's spacing (8 at 1e8): torch's float32
        # gradients are off by that much too; fusedce's may be no further off.
        torch_err = float((t32.double() - want).norm())
        err = float((got.double() - want).norm())
        assert err <= 2.0 * torch_err + 1e-5 * float(want.norm()) + 1e-6, (name, err, torch_err)


# --------------------------------------------------------------------------------------------
# Every CPU path of the default suite: the small-call shortcut, the eager rows, compiled rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["small", "eager_rows", "compiled_rows"],
)
@pytest.mark.parametrize("offset", [1e8, 1e30, -3e38])
def test_cpu_paths_offsets(path, offset):
    shape = (8, 37) if path == "small" else (40, 1031)
    x = _logits(shape, offset)
    y = torch.randint(shape[1], (shape[0],), generator=torch.Generator().manual_seed(1))
    compile_was = cpu_compile_enabled()
    try:
        fusedce.set_cpu_compile(path == "compiled_rows")
        with fusedce.use_backend("auto" if path == "small" else "torch"):
            _check_plain(x, y)
    finally:
        fusedce.set_cpu_compile(compile_was)


@pytest.mark.parametrize("offset", [1e8, 1e30])
def test_func_transforms_offsets(offset):
    """Under torch.func (plain torch ops with fusedce's semantics) the answer is the same."""
    x = _logits((8, 1031), offset)
    y = torch.randint(1031, (8,), generator=torch.Generator().manual_seed(1))
    y[0] = -100
    g_func = torch.func.grad(lambda t: fusedce.cross_entropy(t, y, label_smoothing=0.1))(x)
    xr = x.clone().requires_grad_()
    (g_eager,) = torch.autograd.grad(fusedce.cross_entropy(xr, y, label_smoothing=0.1), xr)
    torch.testing.assert_close(g_func, g_eager, rtol=1e-5, atol=1e-7)
    losses = torch.func.vmap(lambda r, t: fusedce.cross_entropy(r, t))(x, y.clamp(min=0))
    ref = F.cross_entropy(x.double(), y.clamp(min=0), reduction="none")
    torch.testing.assert_close(losses.double(), ref, rtol=1e-5, atol=1e-5)
