"""Shared by the kernel tests: inputs, the float64 torch references and the comparisons, for
``fusedce.cross_entropy`` (logits in) and ``fusedce.linear_cross_entropy`` (hidden states and a
weight in)."""

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


def float64_loss(
    logits64, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """torch's loss on float64 logits (N, C, ...), with fusedce's documented mean-of-nothing = 0
    (torch gives NaN where every target is ignored or the batch is empty)."""
    t = target.double() if target.is_floating_point() else target.long()
    w = None if weight is None else weight.double()
    loss = F.cross_entropy(
        logits64,
        t,
        weight=w,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "mean" and not target.is_floating_point() and not (t != ignore_index).any():
        loss = (logits64 * 0).sum()
    if reduction == "mean" and target.is_floating_point() and logits64.numel() == 0:
        loss = (logits64 * 0).sum()
    return loss


def reference(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """torch's loss in float64 on an upcast copy of the logits: (float64 leaf, loss)."""
    x64 = x.detach().double().requires_grad_()
    loss = float64_loss(x64, target, weight, ignore_index, reduction, label_smoothing)
    return x64, loss


def rel_err(a, ref):
    """||a - ref|| / ||ref|| in float64 (||a|| where ref is all zeros)."""
    a, ref = a.double(), ref.double()
    denom = ref.norm()
    return float((a - ref).norm() / denom) if denom > 0 else float(a.norm())


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
    # No result in x.dtype can beat the exact gradient rounded to x.dtype: with many classes a
    # float16 gradient is mostly subnormal, and that rounding alone can exceed the relative bound.
    floor = (gref.to(x.dtype).double() - gref).norm().item()
    bound = GRAD_RTOL[x.dtype] * rtol_scale * gref.norm().item() + floor + 1e-6
    assert err <= bound, (err, bound, gref.norm().item())
    return loss


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy: fusedce.linear_cross_entropy(input, W, target, linear_bias=b)
# --------------------------------------------------------------------------------------------

# Relative-norm tolerances vs float64. Half-precision logits and gradients are rounded to the
# input dtype once (as in eager), so the error is a few units in the last place of that dtype;
# the input and weight gradients sum many such terms, hence looser than GRAD_RTOL.
LINEAR_GRAD_RTOL = {
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
    torch.float64: 1e-10,
}
LINEAR_LOSS_RTOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
    torch.float64: 1e-10,
}


def make_linear_case(lead, D, V, dtype, *, bias=False, ignore_frac=0.0, ignore_index=-100, seed=0):
    """(input (*lead, D), W (V, D), b (V,) or None, target lead) with O(1) logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((*lead, D), generator=g).to(dtype)
    W = (torch.randn((V, D), generator=g) * (2.0 / max(D, 1) ** 0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, lead, generator=g)
    if ignore_frac > 0:
        t = torch.where(torch.rand(lead, generator=g) < ignore_frac, ignore_index, t)
    return x, W, b, t


def linear_reference(x, W, b, t, **kw):
    """float64 loss of F.cross_entropy(F.linear(x, W, b), t) and its float64 leaves [x, W(, b)].

    ``kw``: the loss options (weight, ignore_index, reduction, label_smoothing); the loss has
    the target's shape for reduction="none".
    """
    leaves = [
        a.detach().double().requires_grad_() for a in (x, W) + ((b,) if b is not None else ())
    ]
    x64, W64 = leaves[:2]
    b64 = leaves[2] if b is not None else None
    logits = F.linear(x64, W64, b64)
    V = W.shape[0]
    reduction = kw.get("reduction", "mean")
    loss = float64_loss(
        logits.reshape(-1, V),
        t.reshape(-1),
        weight=kw.get("weight"),
        ignore_index=kw.get("ignore_index", -100),
        reduction=reduction,
        label_smoothing=kw.get("label_smoothing", 0.0),
    )
    if reduction == "none":
        loss = loss.reshape(t.shape)
    return loss, leaves


def check_linear(x, W, b, t, *, rtol_scale=1.0, **kw):
    """fusedce.linear_cross_entropy's loss and all gradients (random upstream gradient) against
    float64; ``kw`` goes to both (loss options, chunk_size, accumulation)."""
    leaves = [a.detach().requires_grad_() for a in (x, W) + ((b,) if b is not None else ())]
    xs, Ws = leaves[:2]
    bs = leaves[2] if b is not None else None
    loss = fusedce.linear_cross_entropy(xs, Ws, t, linear_bias=bs, **kw)
    ref, ref_leaves = linear_reference(x, W, b, t, **kw)
    expected_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    assert loss.shape == ref.shape
    tol = LINEAR_LOSS_RTOL[x.dtype] * rtol_scale
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)).to(loss.dtype)
    grads = torch.autograd.grad(loss, leaves, go)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    for name, g, r, leaf in zip(
        ("input", "weight", "bias"), grads, ref_grads, leaves, strict=False
    ):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert torch.isfinite(g).all(), name
        err = rel_err(g, r)
        tol = LINEAR_GRAD_RTOL[x.dtype] * rtol_scale
        assert err <= tol or float(r.abs().max()) < 1e-12, (name, err)
    return loss


# --------------------------------------------------------------------------------------------
# The one-pass extras: logit_scale, softcap, z_loss, token_weight, return_stats
# --------------------------------------------------------------------------------------------


def extras_float64_loss(
    logits64,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    logit_scale=1.0,
    softcap=None,
    z_loss=0.0,
    token_weight=None,
):
    """The options' definitions in float64, on logits (C,), (N, C) or (N, C, d1, ...).

    z = softcap(logit_scale * x); element i contributes t_i * (l_i + z_loss * lse_i**2) with
    l_i torch's per-element cross-entropy of z (the z-loss only where not ignored); "mean"
    divides by sum_i t_i * w_{y_i} over the non-ignored elements (sum_i t_i for
    probabilities), a zero normaliser giving 0.

    Returns:
        (loss, stats dict with z_loss (reduced as the loss), lse, entropy, correct).
    """
    class_dim = 0 if logits64.dim() == 1 else 1
    C = logits64.shape[class_dim]
    z = logits64 * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    soft = target.is_floating_point()
    t = target.double() if soft else target.long()
    w = None if weight is None else weight.double()
    per = F.cross_entropy(
        z,
        t,
        weight=w,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    lse = torch.logsumexp(z, dim=class_dim)
    valid = torch.ones_like(lse, dtype=torch.bool) if soft else t != ignore_index
    z_part = torch.where(valid, z_loss * lse**2, 0.0)
    tw = torch.ones_like(lse) if token_weight is None else token_weight.double()
    per = tw * (per + z_part)
    z_part = tw * z_part
    if soft:
        denom = tw.sum()
    else:
        w_y = torch.ones_like(lse) if w is None else w[t.clamp(0, C - 1)]
        denom = torch.where(valid, tw * w_y, 0.0).sum()

    def reduce(v):
        if reduction == "none":
            return v
        if reduction == "sum" or v.numel() == 0:
            return v.sum()
        return v.sum() / denom if denom != 0 else v.sum() * 0.0

    logp = torch.log_softmax(z, dim=class_dim)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(class_dim)
    pred = z.argmax(class_dim) if z.numel() else lse.long()
    # Probabilities: their argmax (an empty batch has nothing to compare).
    target_class = t if not soft else t.argmax(class_dim) if t.numel() else pred
    correct = valid & (pred == target_class)
    stats = {
        "z_loss": reduce(z_part).detach(),
        "lse": lse.detach(),
        "entropy": entropy.detach(),
        "correct": correct,
    }
    return reduce(per), stats


def check_extras(x, target, *, return_stats=True, inplace=False, rtol_scale=1.0, **kw):
    """fusedce.cross_entropy with the extras against ``extras_float64_loss``: loss, gradient
    (random upstream gradient) and, with ``return_stats``, every stat.

    ``kw``: the loss options; ``token_weight=True`` draws random token weights in [0, 2).
    """
    out_shape = () if x.dim() == 1 else (x.shape[0], *x.shape[2:])
    if kw.get("token_weight") is True:
        gen = torch.Generator().manual_seed(11)
        kw["token_weight"] = torch.rand(out_shape, generator=gen) * 2.0
    x = x.detach().requires_grad_()
    inp = x * 1.0 if inplace else x  # inplace_backward takes a non-leaf
    out = fusedce.cross_entropy(
        inp, target, inplace_backward=inplace, return_stats=return_stats, **kw
    )
    loss, stats = out if return_stats else (out, None)
    x64 = x.detach().double().requires_grad_()
    ref, ref_stats = extras_float64_loss(x64, target, **kw)
    assert loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert loss.shape == ref.shape
    tol = LOSS_RTOL[x.dtype] * rtol_scale
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=1e-5)
    if stats is not None:
        assert isinstance(stats, fusedce.CrossEntropyStats)
        assert stats.lse.shape == stats.entropy.shape == stats.correct.shape == out_shape
        assert stats.z_loss.shape == loss.shape
        assert not any(s.requires_grad for s in stats)
        assert stats.correct.dtype == torch.bool
        torch.testing.assert_close(stats.z_loss.double(), ref_stats["z_loss"], rtol=tol, atol=1e-5)
        torch.testing.assert_close(stats.lse.double(), ref_stats["lse"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            stats.entropy.double(), ref_stats["entropy"], rtol=1e-4, atol=1e-4
        )
        assert torch.equal(stats.correct, ref_stats["correct"])
    g_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2)).to(loss.dtype)
    (gx,) = torch.autograd.grad(loss, x, g_out)
    (gref,) = torch.autograd.grad(ref, x64, g_out.double())
    assert gx.dtype == x.dtype and gx.shape == x.shape
    err = (gx.double() - gref).norm().item()
    floor = (gref.to(x.dtype).double() - gref).norm().item()
    bound = GRAD_RTOL[x.dtype] * rtol_scale * gref.norm().item() + floor + 1e-6
    assert err <= bound, (err, bound, gref.norm().item())
    return loss, stats


def check_linear_extras(x, W, b, t, *, return_stats=True, rtol_scale=1.0, **kw):
    """fusedce.linear_cross_entropy with the extras against float64 ``F.linear`` followed by
    ``extras_float64_loss``: loss, every gradient (random upstream gradient) and the stats.

    ``kw``: loss options, chunk_size; ``token_weight=True`` draws random weights in [0, 2).
    """
    if kw.get("token_weight") is True:
        gen = torch.Generator().manual_seed(12)
        kw["token_weight"] = torch.rand(t.shape, generator=gen) * 2.0
    leaves = [a.detach().requires_grad_() for a in (x, W) + ((b,) if b is not None else ())]
    bs = leaves[2] if b is not None else None
    out = fusedce.linear_cross_entropy(
        leaves[0], leaves[1], t, linear_bias=bs, return_stats=return_stats, **kw
    )
    loss, stats = out if return_stats else (out, None)
    ref_leaves = [a.detach().double().requires_grad_() for a in leaves]
    logits = F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None)
    V = W.shape[0]
    opts = {k: v for k, v in kw.items() if k not in ("chunk_size", "accumulation")}
    if opts.get("token_weight") is not None:
        opts["token_weight"] = opts["token_weight"].reshape(-1)
    ref, ref_stats = extras_float64_loss(logits.reshape(-1, V), t.reshape(-1), **opts)
    if kw.get("reduction") == "none":
        ref = ref.reshape(t.shape)
    assert loss.shape == ref.shape
    tol = LINEAR_LOSS_RTOL[x.dtype] * rtol_scale
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    if stats is not None:
        assert stats.lse.shape == stats.correct.shape == tuple(t.shape)
        zl = ref_stats["z_loss"].reshape(stats.z_loss.shape)
        torch.testing.assert_close(stats.z_loss.double(), zl, rtol=tol, atol=tol)
        for name in ("lse", "entropy"):
            got = getattr(stats, name).double().reshape(-1)
            torch.testing.assert_close(got, ref_stats[name], rtol=tol, atol=tol)
        if x.dtype in (torch.float32, torch.float64):  # half logits may round a near-tie
            assert torch.equal(stats.correct.reshape(-1), ref_stats["correct"])
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)).to(loss.dtype)
    grads = torch.autograd.grad(loss, leaves, go)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    for name, g, r, leaf in zip(
        ("input", "weight", "bias"), grads, ref_grads, leaves, strict=False
    ):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        err = rel_err(g, r)
        gtol = LINEAR_GRAD_RTOL[x.dtype] * rtol_scale
        assert err <= gtol or float(r.abs().max()) < 1e-12, (name, err)
    return loss, stats
