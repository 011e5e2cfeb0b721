"""``torch.func`` transforms (grad, vmap, jacrev, jacfwd, hessian, vmap over grad) over
fusedce's losses, at every size: against torch in float64, with fusedce's semantics where
torch's differ (an ignored row gets exactly zero gradient even with NaN logits, a mean over
nothing is 0), and against fusedce's own eager path for the options torch lacks.

Under a transform every call computes the loss from differentiable torch ops
(``fusedce.func_transforms``), whatever the backend: not part of the kernel suite. The sizes
straddle ``SMALL_CPU_ELEMENTS`` (32768 logits): below it plain CPU calls would go to
``F.cross_entropy``, above it to the row contract; both must work under every transform.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import fusedce
from fusedce.backends.small_calls import SMALL_CPU_ELEMENTS

# (rows, classes): a small call and one of 40000 logits, past SMALL_CPU_ELEMENTS.
SIZES = [(4, 7), (4, 10000)]
assert SIZES[1][0] * SIZES[1][1] > SMALL_CPU_ELEMENTS
# The options torch's F.cross_entropy shares (class-index targets).
OPTIONS = {
    "plain": {},
    "weight_smoothing": {"label_smoothing": 0.2, "use_weight": True},
    "ignore": {"ignore_index": 2},
    "all": {"label_smoothing": 0.1, "use_weight": True, "ignore_index": 2},
}


def _case(size, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    M, C = size
    x = torch.randn(M, C, dtype=torch.float64, generator=g) * 3
    t = torch.randint(0, C, (M,), generator=g)
    if ignore is not None:
        t[1] = ignore
    w = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    return x, t, w


def _kwargs(name, w):
    kw = dict(OPTIONS[name])
    kw["weight"] = w if kw.pop("use_weight", False) else None
    return kw


def _both(kw, reduction="mean"):
    """(fusedce's loss, torch's loss) as functions of (logits, target)."""

    def ours(x, t):
        return fusedce.cross_entropy(x, t, reduction=reduction, **kw)

    def theirs(x, t):
        return F.cross_entropy(x, t, reduction=reduction, **kw)

    return ours, theirs


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad(size, name, reduction):
    x, t, w = _case(size, ignore=OPTIONS[name].get("ignore_index"))
    ours, theirs = _both(_kwargs(name, w), reduction)
    _close(grad(ours)(x, t), grad(theirs)(x, t))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("name", OPTIONS)
def test_vmap(size, name):
    """A batch of 3 calls; at the larger size each call has 40000 logits."""
    xs, ts, w = zip(
        *(_case(size, seed=s, ignore=OPTIONS[name].get("ignore_index")) for s in (0, 1, 2)),
        strict=True,
    )
    X, T = torch.stack(xs), torch.stack(ts)
    for reduction in ("mean", "none"):
        ours, theirs = _both(_kwargs(name, w[0]), reduction)
        # torch's own vmap rule fails with weights and smoothing (masked_select): a loop.
        _close(vmap(ours)(X, T), torch.stack([theirs(a, b) for a, b in zip(X, T, strict=True)]))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("name", ["plain", "all"])
def test_jacrev(size, name):
    """The Jacobian of the per-row losses: vmap over the backward."""
    x, t, w = _case(size, ignore=OPTIONS[name].get("ignore_index"))
    ours, theirs = _both(_kwargs(name, w), "none")
    _close(jacrev(ours)(x, t), jacrev(theirs)(x, t))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("name", ["plain", "all"])
def test_vmap_over_grad(size, name):
    """Per-sample gradients: vmap(grad(loss)) over a batch of calls."""
    xs, ts, w = zip(
        *(_case(size, seed=s, ignore=OPTIONS[name].get("ignore_index")) for s in (0, 1)),
        strict=True,
    )
    X, T = torch.stack(xs), torch.stack(ts)
    ours, theirs = _both(_kwargs(name, w[0]))
    got = vmap(grad(ours))(X, T)
    _close(got, torch.stack([grad(theirs)(a, b) for a, b in zip(X, T, strict=True)]))


# Forward-mode AD loads torch's jvp decompositions, which still call torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_and_hessian():
    """Forward-mode AD (jacfwd) and second derivatives, which the fused paths refuse."""
    x, t, w = _case((3, 5), ignore=2)
    ours, theirs = _both({"weight": w, "label_smoothing": 0.1, "ignore_index": 2})
    _close(jacfwd(ours)(x, t), jacfwd(theirs)(x, t))
    _close(hessian(ours)(x, t), hessian(theirs)(x, t))


def test_vmap_over_samples_of_every_shape():
    """vmap over rows (1-D input per sample) and over K-dim inputs (N, C, d) per sample."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 9, dtype=torch.float64, generator=g)
    T = torch.randint(0, 9, (6,), generator=g)
    _close(vmap(fusedce.cross_entropy)(X, T), F.cross_entropy(X, T, reduction="none"))
    X = torch.randn(2, 3, 9, 4, dtype=torch.float64, generator=g)
    T = torch.randint(0, 9, (2, 3, 4), generator=g)
    ref = torch.stack([F.cross_entropy(a, b, reduction="none") for a, b in zip(X, T, strict=True)])
    _close(vmap(lambda a, b: fusedce.cross_entropy(a, b, reduction="none"))(X, T), ref)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_soft_targets(size):
    """Probability targets: the gradients of the logits and of the targets, and under vmap."""
    x, _, w = _case(size)
    p = torch.softmax(torch.randn(size, dtype=torch.float64), dim=1)
    kw = {"weight": w, "label_smoothing": 0.1}
    ours, theirs = _both(kw)
    for argnums in (0, 1):
        _close(grad(ours, argnums)(x, p), grad(theirs, argnums)(x, p))
    X, P = torch.stack([x, x.flip(0)]), torch.stack([p, p.flip(1)])
    _close(vmap(ours)(X, P), vmap(theirs)(X, P))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_rows_get_zero_gradient_even_with_nan_logits(size, reduction):
    """fusedce's semantics under the transforms, at both sizes: an ignored row whose logits are
    NaN or -inf (a masked vocabulary) gets exactly zero gradient and leaves the rest finite."""
    x, t, w = _case(size)
    x[1] = float("nan")
    x[2, :3] = float("-inf")
    t[1] = t[2] = -100
    ours, _ = _both({"weight": w, "label_smoothing": 0.1}, reduction)

    def f(x):
        loss = ours(x, t)
        return loss.sum() if reduction == "none" else loss

    g = grad(f)(x)
    assert bool((g[1:3] == 0).all())
    assert bool(torch.isfinite(g).all())
    keep = torch.tensor([0, 3])
    _, theirs = _both({"weight": w, "label_smoothing": 0.1}, reduction)
    ref = grad(lambda z: theirs(z, t[keep]).sum())(x[keep])
    if reduction == "mean":  # the same normaliser: the ignored rows add nothing to it
        _close(f(x), theirs(x[keep], t[keep]))
    _close(g[keep], ref)
    # Per-sample gradients through vmap keep the same zeros.
    G = vmap(grad(f))(torch.stack([x, x]))
    assert bool((G[:, 1:3] == 0).all()) and bool(torch.isfinite(G).all())


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_mean_over_nothing_is_zero(size):
    x, t, _ = _case(size)
    t[:] = -100

    def f(x):
        return fusedce.cross_entropy(x, t)

    assert float(f(x)) == 0.0
    assert bool((grad(f)(x) == 0).all())
    assert bool((vmap(f)(torch.stack([x, x])) == 0).all())
    empty = torch.empty(0, size[1], dtype=torch.float64)
    assert float(vmap(lambda z: fusedce.cross_entropy(z, t[:0]))(empty[None]).sum()) == 0.0


@pytest.mark.parametrize(
    ("size", "reduction"),
    [(SIZES[0], "mean"), (SIZES[0], "sum"), (SIZES[0], "none"), (SIZES[1], "none")],
    ids=str,
)
def test_extras_match_the_eager_path(size, reduction):
    """Options torch lacks (logit_scale, softcap, z_loss, token weights) and return_stats:
    the same numbers as fusedce's eager (fused) path, per sample under vmap."""
    x, t, w = _case(size, ignore=-100)
    tw = torch.rand(size[0], dtype=torch.float64) + 0.1
    kw = dict(
        weight=w,
        label_smoothing=0.1,
        logit_scale=0.7,
        softcap=5.0,
        z_loss=1e-3,
        token_weight=tw,
        return_stats=True,
    )
    xe = x.clone().requires_grad_()
    loss_e, stats_e = fusedce.cross_entropy(xe, t, reduction=reduction, **kw)
    up = torch.rand_like(loss_e)
    (ge,) = torch.autograd.grad(loss_e, xe, up)

    def f(z):
        loss, stats = fusedce.cross_entropy(z, t, reduction=reduction, **kw)
        return (loss * up).sum(), (loss, stats)

    g, (loss_f, stats_f) = grad(f, has_aux=True)(x)
    _close(loss_f, loss_e)
    _close(g, ge)
    for a, b in zip(stats_f, stats_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # vmap over a batch of two identical calls gives each one's loss and stats.
    loss_v, stats_v = vmap(lambda z: f(z)[1])(torch.stack([x, x]))
    _close(loss_v, torch.stack([loss_e, loss_e]))
    for a, b in zip(stats_v, stats_e, strict=True):
        torch.testing.assert_close(a, torch.stack([b, b]), rtol=1e-10, atol=1e-12)


def test_vmap_over_token_weights_and_class_weights():
    """Batched token weights (checked on every sample) and class weights."""
    x, t, _ = _case((4, 7))
    TW = torch.rand(3, 4, dtype=torch.float64)
    got = vmap(lambda tw: fusedce.cross_entropy(x, t, token_weight=tw, reduction="sum"))(TW)
    ref = (F.cross_entropy(x, t, reduction="none")[None] * TW).sum(1)
    _close(got, ref)
    W = torch.rand(3, 7, dtype=torch.float64) + 0.5
    got = vmap(lambda w: fusedce.cross_entropy(x, t, weight=w))(W)
    _close(got, torch.stack([F.cross_entropy(x, t, weight=v) for v in W]))
    TW[1, 2] = -1.0
    with pytest.raises(ValueError, match="negative"):
        vmap(lambda tw: fusedce.cross_entropy(x, t, token_weight=tw))(TW)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_bad_index_raises_under_vmap(size):
    """The class-index check reads every sample's indices, also those vmap batches."""
    x, t, _ = _case(size)
    T = torch.stack([t, t])
    T[1, 3] = size[1]
    with pytest.raises(IndexError, match="cross_entropy"):
        vmap(fusedce.cross_entropy)(torch.stack([x, x]), T)
    with pytest.raises(IndexError, match="out of bounds"):
        W = torch.randn(size[1], 5, dtype=torch.float64)
        h = torch.randn(size[0], 5, dtype=torch.float64)
        vmap(lambda t: fusedce.linear_cross_entropy(h, W, t))(T)
    fusedce.set_target_check(False)
    try:  # unchecked: the bad row's loss is NaN, as on the fused paths
        loss = vmap(lambda a, b: fusedce.cross_entropy(a, b, reduction="none"))(
            torch.stack([x, x]), T
        )
        assert bool(loss[1, 3].isnan()) and bool(torch.isfinite(loss[0]).all())
    finally:
        fusedce.set_target_check(True)


# --------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------


def _linear_case(N, D, V, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, dtype=torch.float64, generator=g)
    W = torch.randn(V, D, dtype=torch.float64, generator=g) * 0.3
    b = torch.randn(V, dtype=torch.float64, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore is not None:
        t[1] = ignore
    w = torch.rand(V, dtype=torch.float64, generator=g) + 0.5
    return h, W, b, t, w


@pytest.mark.parametrize("V", [7, 10000], ids=["small", "40000-logits"])
@pytest.mark.parametrize("name", ["plain", "all"])
def test_linear_grad_vmap_jacrev(V, name):
    """grad over (input, weight, bias), vmap over calls, jacrev of the per-row losses and
    vmap over grad: against F.cross_entropy(F.linear(...)) in float64."""
    h, W, b, t, w = _linear_case(4, 5, V, ignore=OPTIONS[name].get("ignore_index"))
    kw = _kwargs(name, w)

    def ours(h, W, b, t, reduction="mean"):
        return fusedce.linear_cross_entropy(
            h, W, t, linear_bias=b, reduction=reduction, chunk_size=3, **kw
        )

    def theirs(h, W, b, t, reduction="mean"):
        return F.cross_entropy(F.linear(h, W, b), t, reduction=reduction, **kw)

    got, ref = grad(ours, (0, 1, 2))(h, W, b, t), grad(theirs, (0, 1, 2))(h, W, b, t)
    for a, r in zip(got, ref, strict=True):
        _close(a, r)
    H = torch.stack([h, h.flip(0), 2 * h])
    T = torch.stack([t, t.flip(0), t])
    # torch's own vmap rule fails with weights and smoothing (masked_select): loops.
    ref = torch.stack([theirs(a, W, b, y) for a, y in zip(H, T, strict=True)])
    _close(vmap(ours, (0, None, None, 0))(H, W, b, T), ref)
    _close(jacrev(ours)(h, W, b, t, "none"), jacrev(theirs)(h, W, b, t, "none"))
    per_sample = vmap(grad(ours, 1), (0, None, None, 0))(H, W, b, T)
    ref = torch.stack([grad(theirs, 1)(a, W, b, y) for a, y in zip(H, T, strict=True)])
    _close(per_sample, ref)


def test_linear_semantics_and_extras():
    """Ignored rows with NaN hidden states get zero gradient; the extras and the stats match
    the eager fused path; a (B, T, D) input under vmap."""
    h, W, b, t, w = _linear_case(5, 4, 9)
    h[1] = float("nan")
    t[1] = -100

    def f(h):
        return fusedce.linear_cross_entropy(h, W, t, linear_bias=b, weight=w)

    g = grad(f)(h)
    assert bool((g[1] == 0).all()) and bool(torch.isfinite(g).all())
    h[1] = 0.0
    tw = torch.rand(5, dtype=torch.float64)
    kw = dict(linear_bias=b, logit_scale=0.5, softcap=4.0, z_loss=1e-3, token_weight=tw)
    We = W.clone().requires_grad_()
    loss_e, stats_e = fusedce.linear_cross_entropy(h, We, t, return_stats=True, **kw)
    (ge,) = torch.autograd.grad(loss_e, We)
    _close(grad(lambda W: fusedce.linear_cross_entropy(h, W, t, **kw))(W), ge)
    loss_v, stats_v = vmap(
        lambda W: fusedce.linear_cross_entropy(h, W, t, return_stats=True, **kw)
    )(W[None])
    _close(loss_v[0], loss_e)
    for a, e in zip(stats_v, stats_e, strict=True):
        torch.testing.assert_close(a[0], e, rtol=1e-10, atol=1e-12)
    H = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    T = torch.randint(0, 9, (2, 3, 6))
    got = vmap(lambda a, y: fusedce.linear_cross_entropy(a, W, y, reduction="none"))(H, T)
    ref = F.cross_entropy(F.linear(H, W).reshape(-1, 9), T.reshape(-1), reduction="none")
    _close(got, ref.reshape(2, 3, 6))


def test_modules_under_vmap():
    """The nn.Module wrappers take the same route."""
    x, t, w = _case((4, 7))
    loss = fusedce.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    _close(
        vmap(loss)(torch.stack([x, x]), torch.stack([t, t])),
        torch.stack([F.cross_entropy(x, t, weight=w, label_smoothing=0.1)] * 2),
    )
    head = fusedce.LinearCrossEntropyLoss(5, 7, dtype=torch.float64)
    h = torch.randn(4, 5, dtype=torch.float64)
    params = dict(head.named_parameters())
    g = grad(lambda p: torch.func.functional_call(head, p, (h, t)))(params)
    ref = grad(lambda W: F.cross_entropy(h @ W.t(), t))(params["linear.weight"])
    _close(g["linear.weight"], ref)


def test_sharded_call_under_a_transform_names_fusedce_and_the_transform():
    """The vocabulary-parallel loss cannot run on functorch's wrapped tensors: one clear error."""
    x, t, _ = _case((4, 7))
    with pytest.raises(NotImplementedError, match=r"fusedce\.cross_entropy.*vmap"):
        vmap(lambda z: fusedce.cross_entropy(z, t, process_group=object()))(x[None])
    W = torch.randn(7, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"fusedce\.linear_cross_entropy.*grad"):
        grad(lambda h: fusedce.linear_cross_entropy(h, W, t, process_group=object()))(
            torch.randn(4, 3, dtype=torch.float64)
        )


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_compiled_transforms(fn):
    """torch.compile(fullgraph=True) of a function that applies grad and vmap: the torch ops
    are traced, at 40000 logits."""
    torch._dynamo.reset()
    M, C = SIZES[1]
    x, t, w = _case(SIZES[1], ignore=-100)
    kw = {"weight": w, "label_smoothing": 0.1}
    if fn == "cross_entropy":
        ours, theirs = _both(kw)
        inp = x
    else:
        W = torch.randn(C, 6, dtype=torch.float64) * 0.3
        inp = torch.randn(M, 6, dtype=torch.float64)

        def ours(h, t):
            return fusedce.linear_cross_entropy(h, W, t, **kw)

        def theirs(h, t):
            return F.cross_entropy(F.linear(h, W), t, **kw)

    def step(inp, t):
        per_sample = vmap(ours)(torch.stack([inp, 2 * inp]), torch.stack([t, t]))
        return grad(ours)(inp, t), per_sample

    g, per_sample = torch.compile(step, fullgraph=True, backend="aot_eager")(inp, t)
    _close(g, grad(theirs)(inp, t))
    _close(per_sample, torch.stack([theirs(inp, t), theirs(2 * inp, t)]))
