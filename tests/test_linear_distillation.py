"""``fusedce.linear_distillation_loss`` (the fused head) against the float64 reference of the
materialised logits, gradients of input, weight and bias included, at several chunk sizes; and
its errors. A kernel test (interpreter and torch backend)."""

from __future__ import annotations

import pytest
import torch
from distill_reference import reference, rel_err, sparse_teacher

from fusedce.distillation.api import linear_distillation_loss

pytestmark = pytest.mark.kernel

# The gradients of W and x sum over rows / classes of a gradient rounded to the input dtype.
GRAD_RTOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 2.5e-2, torch.float64: 1e-10}


def _head_reference(x, W, b, kw, upstream):
    """The float64 reference through the logits x @ W.T + b, with d/dx, d/dW, d/db. The
    logits are those of the input dtype (the head's GEMM rounds them so), then upcast."""
    xd, Wd = x.double().requires_grad_(), W.double().requires_grad_()
    bd = b.double().requires_grad_() if b is not None else None
    logits = xd @ Wd.t() + (bd if bd is not None else 0.0)
    # addmm: the bias added before the one rounding, as the head's chunks do.
    x2 = x.reshape(-1, x.shape[-1])
    rounded = (torch.addmm(b, x2, W.t()) if b is not None else x2 @ W.t()).double()
    rounded = rounded.reshape(*x.shape[:-1], -1)
    kw = dict(kw)
    if "teacher_input" in kw:
        tx, tW, tb = kw.pop("teacher_input"), kw.pop("teacher_weight"), kw.pop("teacher_bias")
        t2 = torch.addmm(tb, tx.reshape(-1, tx.shape[-1]), tW.t())
        kw["teacher_logits"] = t2.double().reshape(*tx.shape[:-1], -1)
    loss, g_logits = reference(rounded, **kw, upstream=upstream)
    grads = torch.autograd.grad(logits, [t for t in (xd, Wd, bd) if t is not None], g_logits)
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["dense", "bin", "renormalize"])
def test_fused_head_matches_reference(form, dtype):
    # N = 10 rows in a (2, 5) layout, D = 16, V = 37 (prime); chunk sizes 1 (a chunk per row),
    # 3 (a short last chunk) and None (one chunk); the divergences and reductions rotate.
    g = torch.Generator().manual_seed(11)
    N, D, V, Dt = 10, 16, 37, 12
    x = (torch.randn(2, 5, D, generator=g)).to(dtype)
    W = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype)
    target = torch.randint(0, V, (2, 5), generator=g)
    target[1, 2] = -100
    if form == "dense":
        kw = {
            "teacher_input": torch.randn(2, 5, Dt, generator=g).to(dtype),
            "teacher_weight": (torch.randn(V, Dt, generator=g) * 0.5).to(dtype),
            "teacher_bias": (torch.randn(V, generator=g) * 0.1).to(dtype),
        }
    else:
        ids, logp = sparse_teacher(N, V, 6, pad=1)
        kw = {"teacher_ids": ids.reshape(2, 5, 6), "teacher_log_probs": logp.reshape(2, 5, 6)}
        kw["tail"] = form
    cases = [
        (1, "forward_kl", "mean", {}),
        (3, "reverse_kl", "none", {"target": target, "hard_weight": 0.25, "temperature": 2.0}),
        (None, "jsd", "sum", {"target": target, "beta": 0.3}),
    ]
    for chunk, divergence, reduction, extra in cases:
        opts = dict(kw, divergence=divergence, reduction=reduction, **extra)
        xs, Ws, bs = (t.clone().requires_grad_() for t in (x, W, b))
        loss = linear_distillation_loss(xs, Ws, linear_bias=bs, chunk_size=chunk, **opts)
        # Random per-row factors for "none", a scalar other than 1 otherwise.
        up = torch.randn(loss.shape, generator=g) if reduction == "none" else torch.tensor(0.7)
        (loss * up).sum().backward()
        ref_loss, (gx, gW, gb) = _head_reference(x, W, b, opts, up)
        torch.testing.assert_close(loss.double(), ref_loss, atol=1e-4, rtol=1e-4)
        for got, want in ((xs.grad, gx), (Ws.grad, gW), (bs.grad, gb)):
            assert got.dtype == dtype
            assert rel_err(got, want) < GRAD_RTOL[dtype], (chunk, rel_err(got, want))


def test_no_grad_and_weight_only():
    # Only the weight requires grad (a frozen input), and a no-grad evaluation call.
    x, W = torch.randn(7, 8), torch.randn(11, 8, requires_grad=True)
    ids, logp = sparse_teacher(7, 11, 3)
    kw = {"teacher_ids": ids, "teacher_log_probs": logp, "divergence": "reverse_kl"}
    linear_distillation_loss(x, W, chunk_size=2, **kw).backward()
    _, (_, gW) = _head_reference(x.requires_grad_(False), W.detach(), None, kw, torch.ones(()))
    assert rel_err(W.grad, gW) < 5e-5
    with torch.no_grad():
        loss = linear_distillation_loss(x, W, **kw, reduction="none")
    ref = reference(x.double() @ W.detach().double().t(), **kw, reduction="none")[0]
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)


def test_errors():
    x, W = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    ids, logp = sparse_teacher(4, 10, 3)
    tx, tW = torch.randn(4, 6), torch.randn(10, 6)
    f = linear_distillation_loss
    cases = [
        (ValueError, "pass the teacher", lambda: f(x, W)),
        (ValueError, "go together", lambda: f(x, W, teacher_input=tx)),
        (
            ValueError,
            "requires grad",
            lambda: f(x, W, teacher_input=tx, teacher_weight=tW.requires_grad_()),
        ),
        (ValueError, "classes", lambda: f(x, W, teacher_input=tx, teacher_weight=tW.detach()[:9])),
        (
            ValueError,
            "leading shape",
            lambda: f(x, W, teacher_input=tx[:3], teacher_weight=tW.detach()),
        ),
        (TypeError, "one dtype", lambda: f(x, W.double(), teacher_ids=ids, teacher_log_probs=logp)),
        (ValueError, r"\(V, D\)", lambda: f(x, W[:, :5], teacher_ids=ids, teacher_log_probs=logp)),
        (
            ValueError,
            "chunk_size",
            lambda: f(x, W, teacher_ids=ids, teacher_log_probs=logp, chunk_size=0),
        ),
        (
            ValueError,
            "not both",
            lambda: f(
                x,
                W,
                teacher_input=tx,
                teacher_weight=tW.detach(),
                teacher_ids=ids,
                teacher_log_probs=logp,
            ),
        ),
        (
            IndexError,
            "out of bounds",
            lambda: f(x, W, teacher_ids=ids + 10, teacher_log_probs=logp),
        ),
    ]
    for kind, match, call in cases:
        with pytest.raises(kind, match=match) as info:
            call()
        assert str(info.value).startswith("linear_distillation_loss"), str(info.value)
