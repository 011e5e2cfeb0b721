"""The distillation losses under ``torch.compile(fullgraph=True)``: the custom ops and their
fakes (``torch.library.opcheck``: the fakes' shapes, dtypes and strides against the real
outputs, and the autograd registration), and compiled calls against eager ones."""

from __future__ import annotations

import pytest
import torch
from distill_reference import rel_err, sparse_teacher

import fusedce
from fusedce.distillation import custom_ops as dist
from fusedce.distillation import custom_ops as lin


def _sparse(N, V, k, shape):
    ids, logp = sparse_teacher(N, V, k, pad=1)
    return ids.reshape(*shape, k), logp.reshape(*shape, k)


def test_custom_ops_pass_opcheck():
    # A transposed (non-contiguous) logits view: the fakes must give the real op's contiguous
    # outputs. Every reduction, with and without the gradient.
    x = torch.randn(37, 6).t()
    t = torch.randn(6, 37)
    ids, logp = sparse_teacher(6, 37, 4, pad=1)
    y = torch.randint(0, 37, (6,))
    opts = ("jsd", 0.5, 2.0, "bin", -100, 0.25)
    for reduction in ("mean", "sum", "none"):
        for teacher in ((t, None, None), (None, ids, logp)):
            args = (x.requires_grad_(True), *teacher, y, *opts, reduction, True)
            torch.library.opcheck(dist.distillation_op, args)
    row_factor = torch.randn(6)
    torch.library.opcheck(
        dist._distillation_grad_op, (x.detach(), t, None, None, y, row_factor, *opts)
    )
    W, b = torch.randn(37, 8, requires_grad=True), torch.randn(37, requires_grad=True)
    h = torch.randn(6, 8, requires_grad=True)
    for reduction in ("mean", "none"):
        args = (h, W, b, None, None, None, ids, logp, y, *opts, reduction, 4, True, True, True)
        torch.library.opcheck(lin.linear_distillation_op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_eager(dtype):
    g = torch.Generator().manual_seed(2)
    V, D = 37, 8
    logits = torch.randn(2, 5, V, generator=g).to(dtype)
    teacher = torch.randn(2, 5, V, generator=g).to(dtype)
    ids, logp = _sparse(10, V, 5, (2, 5))
    y = torch.randint(0, V, (2, 5), generator=g)
    h, W, b = torch.randn(2, 5, D).to(dtype), torch.randn(V, D).to(dtype), torch.randn(V).to(dtype)
    th, tW = torch.randn(2, 5, 6).to(dtype), torch.randn(V, 6).to(dtype)
    up = torch.randn(2, 5, generator=g)

    def f(logits, h, W, b):
        a = fusedce.distillation_loss(logits, teacher_logits=teacher, divergence="reverse_kl")
        c = fusedce.distillation_loss(
            logits,
            teacher_ids=ids,
            teacher_log_probs=logp,
            target=y,
            hard_weight=0.3,
            reduction="none",
            tail="renormalize",
            temperature=1.5,
        )
        d = fusedce.linear_distillation_loss(
            h,
            W,
            linear_bias=b,
            teacher_input=th,
            teacher_weight=tW,
            divergence="jsd",
            chunk_size=3,
        )
        e = fusedce.linear_distillation_loss(
            h, W, teacher_ids=ids, teacher_log_probs=logp, reduction="none", chunk_size=4
        )
        return a + (c * up).sum() + d + (e * up).sum()  # fmt: skip

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        ins = [t.clone().requires_grad_() for t in (logits, h, W, b)]
        out = fn(*ins)
        out.backward()
        results.append((out, [t.grad for t in ins]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    for a, c in zip(g1, g2, strict=True):
        assert rel_err(c, a) < 1e-5
