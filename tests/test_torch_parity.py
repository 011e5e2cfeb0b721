"""Parity with torch where a loss library most easily differs silently.

Kernel suite (marker ``kernel``): runs through the Triton interpreter and through the torch
backend. Each test names the torch behaviour it pins.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from ce_reference import make_logits, make_target

pytestmark = pytest.mark.kernel

INTERPRETED = fusedce.uses_triton(torch.empty(0))


def _cross_entropy_samples(dtype: torch.dtype):
    """PyTorch's own OpInfo samples of F.cross_entropy (requires_grad=True)."""
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_opinfo_samples(dtype):
    """Every OpInfo sample: loss, input gradient, and the probability target's gradient."""
    samples = _cross_entropy_samples(torch.float32)
    assert len(samples) >= 21
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for i, s in enumerate(samples):
        x = s.input.detach().to(dtype).requires_grad_()
        t = s.args[0].detach()
        soft = t.is_floating_point()
        t = t.to(dtype).requires_grad_(s.args[0].requires_grad) if soft else t
        x64 = x.detach().double().requires_grad_()
        t64 = t.detach().double().requires_grad_(t.requires_grad) if soft else t
        kw = dict(s.kwargs)
        ours = fusedce.cross_entropy(x, t, **kw)
        kw64 = {**kw, "weight": kw["weight"].double()} if "weight" in kw else kw
        ref = F.cross_entropy(x64, t64, **kw64)
        torch.testing.assert_close(ours.double(), ref.detach(), **tol, msg=f"sample {i} loss")
        up = torch.randn(ours.shape, generator=torch.Generator().manual_seed(i))
        leaves = (x, t) if soft and t.requires_grad else (x,)
        leaves64 = (x64, t64) if soft and t.requires_grad else (x64,)
        got = torch.autograd.grad(ours, leaves, up.to(ours.dtype))
        want = torch.autograd.grad(ref, leaves64, up.double())
        for a, b in zip(got, want, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, **tol, msg=f"sample {i} gradient")


def test_negative_class_weights_divide_as_torch():
    """A negative mean normaliser divides (only an exactly zero one gives 0)."""
    w = torch.tensor([-8.4784, -1.7658, -4.3228])
    x = torch.tensor([[-8.4784, -1.7658, -4.3228], [-2.4005, -7.9506, 3.6116]])
    t = torch.tensor([0, 0])
    ref = F.cross_entropy(x.double(), t, weight=w.double())
    assert ref.item() == pytest.approx(6.4014, abs=1e-4)
    torch.testing.assert_close(fusedce.cross_entropy(x, t, weight=w).double(), ref)
    lin = torch.eye(3)  # linear_cross_entropy with W = I gives the same logits
    got = fusedce.linear_cross_entropy(x, lin, t, weight=w)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [5, 20000])  # one-program prologue; torch reductions past it
def test_int32_targets_with_an_ignore_index_outside_int32(rows):
    """ignore_index = 2**32 must not wrap to class 0 in an int32 comparison."""
    C = 4
    x = make_logits((rows, C), torch.float32)
    t = torch.arange(rows, dtype=torch.int32) % C  # class 0 included
    ref = F.cross_entropy(x.double(), t.long(), ignore_index=2**32)
    got = fusedce.cross_entropy(x, t, ignore_index=2**32)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    got = fusedce.linear_cross_entropy(x, torch.eye(C), t, ignore_index=2**32)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_uint8_class_indices_as_torch():
    x = make_logits((6, 5), torch.float32)
    t = torch.tensor([0, 4, 2, 1, 3, 0], dtype=torch.uint8)
    ref = F.cross_entropy(x.double(), t)
    torch.testing.assert_close(fusedce.cross_entropy(x, t).double(), ref)
    got = fusedce.linear_cross_entropy(x, torch.eye(5), t)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_create_graph_raises_naming_it(fn):
    """A gradient penalty needs double backward: a clear error, not a silent detached grad.

    On the row contract (every GPU call; set_backend("torch") on the CPU); small plain CPU calls
    on the default backend are torch's own operator, whose double backward works (below)."""
    x = make_logits((4, 6), torch.float32).requires_grad_()
    t = torch.tensor([0, 1, 2, 3])
    with fusedce.use_backend(fusedce.get_backend() if fusedce.uses_triton(x) else "torch"):
        loss = (
            fusedce.cross_entropy(x, t)
            if fn == "cross_entropy"
            else fusedce.linear_cross_entropy(x, torch.eye(6), t)
        )
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.skipif(
    fusedce.uses_triton(torch.empty(1)), reason="under TRITON_INTERPRET=1 CPU calls take Triton"
)
def test_small_cpu_call_double_backward_is_torchs():
    x = make_logits((4, 6), torch.float32).requires_grad_()
    t = torch.tensor([0, 1, 2, 3])
    with fusedce.use_backend("auto"):
        (g,) = torch.autograd.grad(fusedce.cross_entropy(x, t), x, create_graph=True)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(x, t), x, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), x)
    (h_ref,) = torch.autograd.grad(g_ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_class_weight_requiring_grad_raises_as_torch(fn):
    x = make_logits((4, 6), torch.float32).requires_grad_()
    t = torch.tensor([0, 1, 2, 3])
    w = torch.rand(6).requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable with respect to the class weights"):
        if fn == "cross_entropy":
            fusedce.cross_entropy(x, t, weight=w)
        else:
            fusedce.linear_cross_entropy(x, torch.eye(6), t, weight=w)


def test_inplace_backward_on_a_leaf_that_requires_grad_raises():
    x = make_logits((4, 6), torch.float32).requires_grad_()
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="leaf"):
        fusedce.cross_entropy(x, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    assert torch.equal(x.detach(), before)


def test_ignore_index_none_means_the_default_in_both():
    x = make_logits((4, 6), torch.float32)
    t = torch.tensor([0, -100, 2, 3])
    ref = F.cross_entropy(x.double(), t)
    for got in (
        fusedce.cross_entropy(x, t, ignore_index=None),
        fusedce.linear_cross_entropy(x, torch.eye(6), t, ignore_index=None),
        fusedce.CrossEntropyLoss(ignore_index=None)(x, t),
    ):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        fusedce.cross_entropy(x, t, ignore_index=1.5)


def _ulps(got: torch.Tensor, ref: torch.Tensor, slack: torch.Tensor) -> float:
    """Largest (|got - ref| - slack) in units in the last place of got's dtype at ref."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[got.dtype]
    min_exp = {torch.bfloat16: -126, torch.float16: -14}[got.dtype]
    _, e = torch.frexp(ref)
    ulp = torch.ldexp(torch.ones_like(ref), (e - 1).clamp(min=min_exp) - mant)
    return (((got.double() - ref).abs() - slack).clamp(min=0) / ulp).max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 300), (4, 20011)])  # one tile; two sweeps
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_per_row_gradient_is_rounded_once(dtype, shape, kind):
    """reduction="none" with a random upstream gradient: the half-precision gradient is the
    float64 one rounded once -- half an ulp beyond the float32 arithmetic's own error (where
    a * p - b cancels, a few float32 ulps of a * p). The interpreter truncates instead of
    rounding: one ulp. A gradient stored in forward and rescaled in backward is rounded twice
    (up to about 1.6 ulp measured)."""
    x = make_logits(shape, dtype).requires_grad_()
    t = make_target(shape, kind)
    up = torch.randn(shape[0], generator=torch.Generator().manual_seed(5))
    loss = fusedce.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    (g,) = torch.autograd.grad(loss, x, up)
    x64 = x.detach().double().requires_grad_()
    t64 = t.double() if kind == "soft" else t
    ref = F.cross_entropy(x64, t64, reduction="none", label_smoothing=0.1)
    (g64,) = torch.autograd.grad(ref, x64, up.double())
    p64 = torch.softmax(x64.detach(), 1)
    slack = 8 * 2.0**-24 * (up.double().abs()[:, None] * p64 + g64.abs())
    assert _ulps(g, g64, slack) <= (1.0 if INTERPRETED else 0.5)


def test_linear_per_row_gradient_is_rounded_once():
    """The fused head's reduction="none" folds each row's factor in before its one rounding."""
    N, D, V = 64, 16, 300
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).bfloat16()
    W = (torch.randn(V, D, generator=g) * 0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    loss = fusedce.linear_cross_entropy(x, W, t, reduction="none", chunk_size=16)
    loss.backward(up)
    # Reference: the bf16 logits the kernel sees, the float64 gradient of the loss from them.
    logits = (x.float() @ W.detach().float().t()).bfloat16().double().requires_grad_()
    ref = F.cross_entropy(logits, t, reduction="none")
    (g_logits,) = torch.autograd.grad(ref, logits, up.double())
    # grad_W = g_logits.T @ x accumulated in float32 from bf16 g: compare at bf16 level.
    gw_ref = g_logits.t() @ x.double()
    err = (W.grad.double() - gw_ref).norm() / gw_ref.norm()
    assert err.item() < (8e-3 if INTERPRETED else 4e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_target_gradient_with_k_dims_and_smoothing(reduction):
    """d loss / d target for (N, C, d1) probabilities, label smoothing and class weights."""
    x = make_logits((3, 5, 4), torch.float32).requires_grad_()
    p = make_target((3, 5, 4), "soft").requires_grad_()
    w = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.5
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2)
    ours = fusedce.cross_entropy(x, p, **kw)
    x64, p64 = (a.detach().double().requires_grad_() for a in (x, p))
    ref = F.cross_entropy(x64, p64, **{**kw, "weight": w.double()})
    up = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(ours, (x, p), up)
    want = torch.autograd.grad(ref, (x64, p64), up.double())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_probability_target_gradient_refuses_overwritten_logits():
    """inplace_backward would overwrite the logits the target's gradient reads: it then keeps
    them (a new gradient buffer), and the result is still torch's."""
    h = make_logits((4, 6), torch.float32).requires_grad_()
    logits = h * 1.0
    p = make_target((4, 6), "soft").requires_grad_()
    loss = fusedce.cross_entropy(logits, p, inplace_backward=True)
    (gp,) = torch.autograd.grad(loss, p)
    p64 = p.detach().double().requires_grad_()
    ref = F.cross_entropy(h.detach().double(), p64)
    (gp_ref,) = torch.autograd.grad(ref, p64)
    torch.testing.assert_close(gp.double(), gp_ref, rtol=1e-5, atol=1e-6)
