"""One input, one answer: every CPU path of ``fusedce.cross_entropy`` agrees, at every size.

A property test draws shapes, dtypes, common offsets, masks (-inf logits, NaN or inf in ignored
rows), options and paths, and asserts that each path gives the documented answer (float64
torch on upcast copies, with ignored rows contributing nothing and getting a zero gradient)
and that the paths agree with each other. The paths: the small-call shortcut to
``F.cross_entropy`` (default backend), the torch backend's eager rows, its Inductor-compiled
rows, and -- in the kernel suite's interpreter run -- the Triton kernel.

Also: softcap precision against the torch backend (an accurate tanh in the kernel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from ce_reference import extras_float64_loss
from fusedce.backends import uses_triton
from fusedce.backends.cpu_compiled import cpu_compile_enabled

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

IGNORE = -100
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run(path: str, x: torch.Tensor, y: torch.Tensor, kw: dict):
    """(loss, gradient) of one path, with a fixed upstream gradient."""
    compile_was = cpu_compile_enabled()
    x = x.detach().clone().requires_grad_()
    try:
        fusedce.set_cpu_compile(path == "compiled_rows")
        backend = "torch" if path in ("eager_rows", "compiled_rows") else "auto"
        with fusedce.use_backend(backend):
            loss = fusedce.cross_entropy(x, y, **kw)
    finally:
        fusedce.set_cpu_compile(compile_was)
    up = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (g,) = torch.autograd.grad(loss, x, up)
    return loss.detach(), g


def _reference(x: torch.Tensor, y: torch.Tensor, kw: dict):
    """float64 torch on an upcast copy; ignored rows are zeroed first (they contribute nothing
    and get a zero gradient, whatever their logits); a mean over nothing is 0."""
    ignored = y == kw.get("ignore_index", IGNORE)
    x64 = torch.where(ignored[:, None], 0.0, x.detach().double()).requires_grad_()
    w = kw.get("weight")
    kw64 = dict(kw, weight=None if w is None else w.double())
    loss = F.cross_entropy(x64, y, **kw64)
    if kw.get("reduction", "mean") == "mean" and bool(ignored.all()):
        loss = (x64 * 0).sum()
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (g,) = torch.autograd.grad(loss, x64, up)
    return loss.detach(), g


def _paths() -> list[str]:
    if uses_triton(torch.empty(1)):  # the interpreter run: CPU calls take the Triton kernel
        return ["triton", "eager_rows"]
    return ["small", "eager_rows", "compiled_rows"]


@st.composite
def _cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    M = draw(st.integers(0, 40))
    V = draw(st.sampled_from([1, 2, 3, 37, 130, 1031]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    big = {torch.float32: [1e3, 1e8, -1e30], torch.float16: [6e4], torch.bfloat16: [1e8]}[dtype]
    offset = draw(st.sampled_from([0.0, *big]))
    x = (torch.randn(M, V, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    y = torch.randint(V, (M,), generator=g)
    ignored = torch.rand(M, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    y = torch.where(ignored, IGNORE, y)
    if M and V > 1 and draw(st.booleans()):
        x[:, -1] = float("-inf")  # a masked class in every row
        y = torch.where(y == V - 1, 0, y)
    poison = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
    if poison is not None:
        x[ignored] = poison  # whatever an ignored row holds, it contributes nothing
    kw = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    if draw(st.booleans()):
        kw["label_smoothing"] = draw(st.sampled_from([0.1, 0.5]))
    if draw(st.booleans()):
        kw["weight"] = torch.rand(V, generator=g) + 0.1
    return x, y, kw


def _close(got, want, rtol, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, what
    finite = want[torch.isfinite(want)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    bad = ~torch.isclose(got, want, rtol=rtol, atol=rtol * (1.0 + scale), equal_nan=True)
    assert not bool(bad.any()), (what, got[bad][:4], want[bad][:4])


def _nan_free_masked(x, kw):
    """-inf logits with label smoothing give an infinite loss: torch and fusedce agree on inf
    but the gradient is then NaN or inf on both sides; such cases are compared on the loss."""
    return kw.get("label_smoothing") and bool(torch.isneginf(x).any())


@pytest.mark.kernel
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(case=_cases())
def test_every_path_gives_the_documented_answer(case):
    x, y, kw = case
    ref_loss, ref_grad = _reference(x, y, kw)
    rtol = TOL[x.dtype]
    results = {path: _run(path, x, y, kw) for path in _paths()}
    for path, (loss, g) in results.items():
        assert torch.isfinite(g[y == IGNORE]).all() and not g[y == IGNORE].any(), path
        _close(loss, ref_loss, 2e-5 if x.dtype == torch.float32 else 1e-4, f"{path} loss")
        if not _nan_free_masked(x, kw):
            # The gradient is rounded once to the input dtype.
            _close(g, ref_grad, rtol, f"{path} grad")
    loss0, g0 = next(iter(results.values()))
    for path, (loss, g) in list(results.items())[1:]:
        _close(loss, loss0, 2e-5 if x.dtype == torch.float32 else 1e-4, f"{path} vs first")
        if not _nan_free_masked(x, kw):
            _close(g, g0, 2 * rtol, f"{path} grad vs first")


# --------------------------------------------------------------------------------------------
# softcap precision: the kernel's tanh against the torch backend's (torch.tanh)
# --------------------------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", [1e-4, 1e-2, 0.3, 0.49, 0.51, 1.0, 5.0, 20.0])
def test_softcap_precision(ratio, dtype):
    """Logits with |x / c| around ``ratio``: loss and gradient errors against float64 no
    worse than torch's own float32 formula (torch.tanh) on the same input."""
    cap = 30.0
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 8, generator=g, dtype=torch.float64) * ratio * cap).to(dtype)
    y = torch.randint(8, (64,), generator=g)
    x = x.requires_grad_()
    loss = fusedce.cross_entropy(x, y, softcap=cap)
    (gx,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    ref, _ = extras_float64_loss(x64, y, softcap=cap)
    (g64,) = torch.autograd.grad(ref, x64)
    x32 = x.detach().float().requires_grad_()
    t32, _ = extras_float64_loss(x32, y, softcap=cap)
    (g32,) = torch.autograd.grad(t32, x32)
    loss_err = abs(float(loss) - float(ref))
    torch_loss_err = abs(float(t32) - float(ref))
    eps32 = torch.finfo(torch.float32).eps
    assert loss_err <= 2 * torch_loss_err + 4 * eps32 * abs(float(ref)), (loss_err, torch_loss_err)
    # The gradient is rounded to the input dtype: compare with torch's rounded the same way.
    torch_gerr = float((g32.to(dtype).double() - g64).norm())
    gerr = float((gx.double() - g64).norm())
    eps = torch.finfo(dtype).eps
    assert gerr <= 2 * torch_gerr + 2 * eps * float(g64.norm()) + 1e-12, (gerr, torch_gerr)
