"""Shared by the kernel tests: inputs, the float64 torch reference and the comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedce

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative-norm tolerance of the gradient per dtype: the gradient is rounded to the input dtype
# once, so its error is about one unit in the last place of that dtype.
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
# The loss is accumulated in float32 whatever the input dtype.
LOSS_RTOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-10}


def make_logits(shape, dtype, scale=3.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def make_target(logits_shape, kind, ignore_frac=0.0, seed=1, dtype=torch.int64):
    """Class indices of shape (N, d1, ...) or probabilities of the logits' shape."""
    g = torch.Generator().manual_seed(seed)
    C = logits_shape[0] if len(logits_shape) == 1 else logits_shape[1]
    if kind == "soft":
        logits = torch.randn(logits_shape, generator=g) * 2
        return torch.softmax(logits, dim=0 if len(logits_shape) == 1 else 1)
    shape = () if len(logits_shape) == 1 else (logits_shape[0], *logits_shape[2:])
    t = torch.randint(0, C, shape, generator=g)
    if ignore_frac > 0:
        t = torch.where(torch.rand(shape, generator=g) < ignore_frac, -100, t)
    return t.to(dtype)


def reference(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """torch's loss in float64 on upcast copies, with fusedce's documented mean-of-nothing = 0."""
    x64 = x.detach().double().requires_grad_()
    t = target.double() if target.is_floating_point() else target.long()
    w = None if weight is None else weight.double()
    loss = F.cross_entropy(
        x64,
        t,
        weight=w,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "mean" and not target.is_floating_point() and not (t != ignore_index).any():
        loss = (x64 * 0).sum()
    if reduction == "mean" and target.is_floating_point() and x.numel() == 0:
        loss = (x64 * 0).sum()
    return x64, loss


def check(x, target, *, grad=True, rtol_scale=1.0, **kw):
    """Loss and gradient (with a random upstream gradient) against the float64 reference.

    ``target`` and a ``weight`` keyword are moved to the logits' device.
    """
    x = x.detach().requires_grad_(grad)
    target = target.to(x.device)
    if kw.get("weight") is not None:
        kw["weight"] = kw["weight"].to(x.device)
    loss = fusedce.cross_entropy(x, target, **kw)
    x64, ref = reference(x, target, **kw)
    expected_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    assert loss.shape == ref.shape
    torch.testing.assert_close(
        loss.double(), ref.detach(), rtol=LOSS_RTOL[x.dtype] * rtol_scale, atol=1e-5, equal_nan=True
    )
    if not grad:
        return loss
    g = torch.Generator().manual_seed(2)
    g_out = torch.randn(loss.shape, generator=g, dtype=loss.dtype).to(loss.device)
    (gx,) = torch.autograd.grad(loss, x, g_out)
    (gref,) = torch.autograd.grad(ref, x64, g_out.double())
    assert gx.dtype == x.dtype and gx.shape == x.shape
    err = (gx.double() - gref).norm().item()
    assert err <= GRAD_RTOL[x.dtype] * rtol_scale * gref.norm().item() + 1e-6, (
        err,
        gref.norm().item(),
    )
    return loss
