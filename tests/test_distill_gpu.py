"""The distillation losses on a CUDA device (skipped elsewhere): the Triton kernel against the
float64 reference at LLM-sized rows, forward without a host sync, and the value checks read in
backward."""

from __future__ import annotations

import pytest
import torch
from distill_reference import reference, rel_err, sparse_teacher

import fusedce

pytestmark = pytest.mark.gpu
DEV = "cuda"
GRAD_RTOL = {torch.float32: 3e-5, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [50257, 131])  # several 4096-column tiles, and one masked tile
def test_cuda_matches_float64(V, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, V, generator=g) * 3).to(dtype)
    teacher = (torch.randn(16, V, generator=g) * 3).to(dtype)
    ids, logp = sparse_teacher(16, V, 64, pad=3)
    target = torch.randint(0, V, (16,), generator=g)
    target[5] = -100
    forms = [
        {"teacher_logits": teacher},
        {"teacher_ids": ids, "teacher_log_probs": logp},
        {"teacher_ids": ids, "teacher_log_probs": logp, "tail": "renormalize"},
    ]
    for form in forms:
        for div, a, red in (
            ("forward_kl", 0.0, "mean"),
            ("reverse_kl", 0.3, "none"),
            ("jsd", 0.0, "sum"),
        ):
            kw = dict(form, divergence=div, hard_weight=a, target=target, temperature=1.5)
            up = torch.randn(16, generator=g) if red == "none" else torch.tensor(0.7)
            x = logits.to(DEV).requires_grad_()
            dev_kw = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            loss = fusedce.distillation_loss(x, **dev_kw, reduction=red)
            (loss * up.to(DEV)).sum().backward()
            ref_loss, ref_grad = reference(logits, **kw, reduction=red, upstream=up)
            torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=5e-5, rtol=1e-5)
            assert rel_err(x.grad.cpu(), ref_grad) < GRAD_RTOL[dtype]


def test_cuda_forward_never_syncs():
    V = 32000
    x = (torch.randn(64, V, device=DEV) * 3).bfloat16().requires_grad_()
    ids, logp = (t.to(DEV) for t in sparse_teacher(64, V, 256))
    h = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(V, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    kw = {"teacher_ids": ids, "teacher_log_probs": logp}

    def calls():
        yield fusedce.distillation_loss(x, **kw)
        yield fusedce.linear_distillation_loss(h, W, **kw)

    for loss in calls():  # warm-up: compile outside the sync check
        loss.backward()
    torch.cuda.synchronize()
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = list(calls())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for loss in losses:
        loss.backward()


def test_cuda_bad_ids_raise_from_backward():
    V = 1000
    x = torch.randn(8, V, device=DEV, requires_grad=True)
    ids, logp = (t.to(DEV) for t in sparse_teacher(8, V, 4))
    ids[3, 1] = 5000
    kw = {"teacher_ids": ids, "teacher_log_probs": logp}
    with pytest.raises(IndexError, match="teacher_ids holds 5000"):  # no gradient: at once
        fusedce.distillation_loss(x.detach(), **kw)
    loss = fusedce.distillation_loss(x, **kw, reduction="none")
    torch.cuda.synchronize()
    assert torch.isnan(loss[3]) and torch.isfinite(loss[:3]).all()
    with pytest.raises(IndexError, match=r"^distillation_loss: teacher_ids holds 5000"):
        loss.sum().backward()
        fusedce.wait_target_check()
