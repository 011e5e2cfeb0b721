"""Float options that change between calls under ``torch.compile(fullgraph=True)``.

A z-loss, logit-scale, softcap or label-smoothing schedule passes a new float each step. From the
second distinct value torch.compile treats the float as symbolic: the option checks must trace
(comparisons, no ``math.isfinite``), and on the CPU the value reaches the custom ops inside a
tensor, so one graph serves every later value (torch's own ``F.cross_entropy`` compiles a graph
per ``label_smoothing`` value and fails under ``fullgraph=True`` after eight). Every compiled
result is held to eager fusedce: loss, statistics and gradients, "mean" and "none".
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedce
from ce_reference import make_linear_case, make_logits, make_target
from fusedce.cross_entropy_loss import _cross_entropy_op
from fusedce.linear_cross_entropy_loss import _lce_op
from fusedce.options import LossOptions, to_op_args

# Three values per option: the first compiles with the value as a constant, the second as a
# symbolic float, the third must reuse that graph.
OPTIONS = {
    "z_loss": (1e-4, 3e-3, 2e-2),
    "logit_scale": (0.5, 1.3, 2.0),
    "softcap": (3.0, 5.0, 30.0),
    "label_smoothing": (0.05, 0.1, 0.3),
}
# Inductor compiles C++ for each graph: a few seconds a test. Every option reaches the ops in
# the same options tensor (`to_op_args`), so Inductor's lowering of it is checked with the
# z-loss; the other options under Inductor are `slow` (the same graph, another float), their
# tracing checked with aot_eager.
CASES = [
    pytest.param(option, backend, marks=[pytest.mark.slow] if slow else [])
    for option in OPTIONS
    for backend in ("aot_eager", "inductor")
    for slow in [backend == "inductor" and option != "z_loss"]
]


@functools.cache
def _inductor_compiles_cpp() -> bool:
    try:
        torch.compile(lambda a: a * 2 + 1, backend="inductor", fullgraph=True)(torch.ones(4))
    except Exception:
        return False
    return True


def _counter(backend: str) -> CompileCounterWithBackend:
    if backend == "inductor" and not _inductor_compiles_cpp():
        pytest.skip("Inductor cannot compile C++ here")
    torch._dynamo.reset()
    return CompileCounterWithBackend(backend)


def _cross_entropy(x, t, stats, option, value):
    """ "mean" and "none" of one call each, and a scalar to differentiate."""
    kw = {option: value, "return_stats": stats}
    mean = fusedce.cross_entropy(x, t, **kw)
    none = fusedce.cross_entropy(x, t, reduction="none", **kw)
    return mean, none


def _linear_cross_entropy(x, W, t, stats, option, value):
    kw = {option: value, "return_stats": stats}
    mean = fusedce.linear_cross_entropy(x, W, t, **kw)
    none = fusedce.linear_cross_entropy(x, W, t, reduction="none", **kw)
    return mean, none


def _backward(outputs, stats: bool, leaves):
    """Loss of "mean" plus a weighted sum of "none"; returns the outputs detached and the
    gradients of ``leaves``."""
    mean, none = outputs
    if stats:
        (mean, mean_stats), (none, none_stats) = mean, none
    up = torch.linspace(0.5, 1.5, none.numel()).reshape(none.shape)
    grads = torch.autograd.grad(mean + (none * up).sum(), leaves)
    flat = [mean.detach(), none.detach()]
    if stats:
        flat += [*mean_stats, *none_stats]
    return flat, grads


def _assert_same(compiled, eager, what):
    for i, (c, e) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(c, e, msg=lambda m, i=i: f"{what}, output {i}: {m}")


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize(("option", "backend"), CASES)
def test_cross_entropy(option, stats, backend):
    counter = _counter(backend)
    x = make_logits((6, 11), torch.float32)
    t = make_target((6, 11), "hard", ignore_frac=0.2)
    f = torch.compile(_cross_entropy, fullgraph=True, backend=counter)
    for value in OPTIONS[option]:
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_c, (g_c,) = _backward(f(xc, t, stats, option, value), stats, [xc])
        out_e, (g_e,) = _backward(_cross_entropy(xe, t, stats, option, value), stats, [xe])
        _assert_same(out_c, out_e, f"{option}={value}")
        torch.testing.assert_close(g_c, g_e)
    assert counter.frame_count <= 2, "a changing float option recompiled"


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize(("option", "backend"), CASES)
def test_linear_cross_entropy(option, stats, backend):
    counter = _counter(backend)
    x, W, _, t = make_linear_case((6,), 8, 13, torch.float32, ignore_frac=0.2)
    f = torch.compile(_linear_cross_entropy, fullgraph=True, backend=counter)
    for value in OPTIONS[option]:
        leaves_c = [x.clone().requires_grad_(), W.clone().requires_grad_()]
        leaves_e = [x.clone().requires_grad_(), W.clone().requires_grad_()]
        out_c, grads_c = _backward(f(*leaves_c, t, stats, option, value), stats, leaves_c)
        out_e, grads_e = _backward(
            _linear_cross_entropy(*leaves_e, t, stats, option, value), stats, leaves_e
        )
        _assert_same(out_c, out_e, f"{option}={value}")
        _assert_same(grads_c, grads_e, f"{option}={value}, gradients")
    assert counter.frame_count <= 2, "a changing float option recompiled"


def test_every_option_changing_at_once():
    """A schedule of all four options together, 4 steps: still one graph after the first."""
    counter = _counter("aot_eager")
    x = make_logits((5, 9), torch.float32)
    t = make_target((5, 9), "hard")

    def step(x, t, s, c, z, ls):
        return fusedce.cross_entropy(
            x, t, logit_scale=s, softcap=c, z_loss=z, label_smoothing=ls, return_stats=True
        )

    f = torch.compile(step, fullgraph=True, backend=counter)
    for i in range(4):
        args = (0.8 + 0.1 * i, 4.0 + i, 1e-3 * (i + 1), 0.05 * (i + 1))
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        (loss_c, stats_c), (loss_e, stats_e) = f(xc, t, *args), step(xe, t, *args)
        loss_c.backward()
        loss_e.backward()
        _assert_same([loss_c, *stats_c, xc.grad], [loss_e, *stats_e, xe.grad], f"step {i}")
    assert counter.frame_count <= 2


def test_probability_target_that_requires_grad():
    """The target's gradient reads the floats in backward: this call keeps them as floats (a
    graph per value, as torch's own), with the same numbers."""
    counter = _counter("aot_eager")
    x = make_logits((5, 9), torch.float32)
    p = make_target((5, 9), "soft")
    f = torch.compile(
        lambda x, p, v: fusedce.cross_entropy(x, p, z_loss=v, logit_scale=2.0),
        fullgraph=True,
        backend=counter,
    )
    for value in (1e-3, 2e-3, 3e-3):
        leaves_c = [x.clone().requires_grad_(), p.clone().requires_grad_()]
        leaves_e = [x.clone().requires_grad_(), p.clone().requires_grad_()]
        loss_c = f(*leaves_c, value)
        loss_e = fusedce.cross_entropy(*leaves_e, z_loss=value, logit_scale=2.0)
        grads_c = torch.autograd.grad(loss_c, leaves_c)
        grads_e = torch.autograd.grad(loss_e, leaves_e)
        _assert_same([loss_c.detach(), *grads_c], [loss_e.detach(), *grads_e], f"z={value}")


_BAD = [(option, bad) for option in OPTIONS for bad in (-1.0, float("inf"), float("nan"))]
_BAD += [("logit_scale", 0.0), ("softcap", 0.0), ("label_smoothing", 1.5)]


@pytest.mark.parametrize(("option", "bad"), _BAD)
def test_bad_value_after_a_schedule_still_raises(option, bad):
    """Once the option is symbolic its checks are guards: a bad value fails them, and the
    retrace raises the check's error (without fullgraph, eagerly, as a ValueError)."""
    x = make_logits((4, 7), torch.float32)
    t = make_target((4, 7), "hard")
    torch._dynamo.reset()
    f = torch.compile(lambda x, t, v: fusedce.cross_entropy(x, t, **{option: v}), backend="eager")
    for value in OPTIONS[option][:2]:
        f(x, t, value)
    with pytest.raises(ValueError, match=option):
        f(x, t, bad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_with_the_options_tensor(reduction):
    """The custom ops with their float options in a tensor (placeholders in the floats): schema,
    fake kernels, autograd registration and AOT dispatch agree, and the result is the one of the
    same options passed as floats."""
    opts = LossOptions(-100, 0.1, reduction, 0.7, 5.0, 0.01)
    names = ("label_smoothing", "logit_scale", "softcap", "z_loss", "float_options")
    floats = [to_op_args(opts, as_tensor=False)[k] for k in names[:4]]
    smoothing, scale, cap, lam, tensor = (to_op_args(opts, as_tensor=True)[k] for k in names)
    assert tensor is not None and tensor.device.type == "cpu"
    x = make_logits((6, 19), torch.float32).requires_grad_()
    t = make_target((6, 19), "hard", ignore_frac=0.2)
    tw = torch.rand(6, generator=torch.Generator().manual_seed(1))
    grad_now = reduction != "none"
    args = (x, t, None, -100, smoothing, reduction, grad_now, scale, cap, lam, tw, True)
    torch.library.opcheck(_cross_entropy_op, args, {"float_options": tensor})
    out = _cross_entropy_op(*args, float_options=tensor)
    ref = _cross_entropy_op(x, t, None, -100, floats[0], reduction, grad_now, *floats[1:], tw, True)
    _assert_same(out, ref, "cross_entropy op")

    xl, W, b, tl = make_linear_case((6,), 4, 11, torch.float32, bias=True)
    xl.requires_grad_()
    W.requires_grad_()
    head = (xl, W, b, tl, None, -100)
    rest = (reduction, 4, "float32", [True, True, False])
    kw = {"token_weight": tw, "extras": True}
    torch.library.opcheck(
        _lce_op,
        (*head, smoothing, *rest, scale, cap, lam),
        {**kw, "float_options": tensor},
    )
    out = _lce_op(*head, smoothing, *rest, scale, cap, lam, **kw, float_options=tensor)
    ref = _lce_op(*head, floats[0], *rest, *floats[1:], **kw)
    _assert_same(out, ref, "linear_cross_entropy op")
