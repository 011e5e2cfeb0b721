"""``token_log_probs`` and ``linear_token_log_probs`` against float64 references of their
definitions (``log_prob_reference``), values and gradients, for random upstream gradients of both
outputs; the inputs that break kernels; every dtype; the fused head at several chunk sizes; the
errors; ``torch.compile(fullgraph=True)`` through the custom ops.

Kernel suite (marker ``kernel``): ``make test`` runs it through the Triton kernels
(TRITON_INTERPRET=1) and through the torch backend (FUSEDCE_BACKEND=torch).
"""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.log_probs import custom_ops as tlp_module
from fusedce.log_probs.api import linear_token_log_probs, token_log_probs
from log_prob_reference import TOL, close, reference

pytestmark = pytest.mark.kernel

IGNORE = -100
NAMES = ("grad_input", "grad_weight", "grad_bias")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _gen(random_seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(random_seed)


def _case(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(logits in ``dtype``, target, temperature) of one named input; see ``CASES``."""
    g = _gen(len(name))
    if name == "rows":
        x = torch.randn(6, 37, generator=g, dtype=torch.float64) * 3
        y = torch.randint(37, (6,), generator=g)
        y[[1, 4]] = IGNORE
        return x.to(dtype), y, 0.7
    if name == "v1":
        return torch.randn(3, 1, generator=g).to(dtype), torch.tensor([0, IGNORE, 0]), 1.0
    if name == "v2":
        x = torch.randn(4, 2, generator=g) * 4
        return x.to(dtype), torch.tensor([1, 0, IGNORE, 1]), 2.0
    if name in ("prime", "prime_long"):
        V = 257 if name == "prime" else 8209
        x = torch.randn(3, V, generator=g) * 2
        return x.to(dtype), torch.tensor([V - 1, 0, 128]), 1.3
    if name == "empty":
        return torch.randn(0, 5).to(dtype), torch.zeros(0, dtype=torch.long), 1.0
    if name == "one":
        return (torch.randn(5, generator=g) * 2).to(dtype), torch.tensor(3), 0.5
    if name == "offset":
        # Far from 0 (1e8; fp16's range ends at 65504): what stays of the logits in the dtype
        # must come out as if they were near 0.
        base = 3e4 if dtype == torch.float16 else 1e8
        x = (torch.randn(4, 19, generator=g, dtype=torch.float64) * 2 + base).to(dtype)
        return x, torch.tensor([0, 18, 7, IGNORE]), 1.0
    if name == "ties":
        x = torch.zeros(3, 11)
        x[1, :4] = 2.0  # a tie of four at the max
        return x.to(dtype), torch.tensor([0, 3, 10]), 1.0
    if name == "nonfinite":
        x = torch.randn(5, 13, generator=g) * 2
        x[1] = float("nan")  # ignored rows: any logits, even NaN / all -inf
        x[2] = float("-inf")
        x[3, ::2] = float("-inf")  # a valid row with masked classes (q = 0 there)
        return x.to(dtype), torch.tensor([4, IGNORE, IGNORE, 5, 0]), 0.9
    if name == "batched":
        # (B, T, V), every other element of a wider buffer: no unit stride along V.
        wide = torch.randn(2, 3, 46, generator=g) * 3
        y = torch.randint(23, (2, 3), generator=g)
        y[0, 1] = IGNORE
        return wide.to(dtype)[..., ::2], y, 1.0
    raise AssertionError(name)


# Why each: many rows with ignored ones and a temperature; V = 1 and V = 2 (degenerate
# softmax); V prime above the interpreter's gradient tile (several tiles, masked tail) and above
# the row kernel's one-tile limit (two sweeps); no rows; one 1-D row (0-dim target); a common
# offset of 1e8 (shift-exactness); ties at the max; ignored rows of NaN / -inf and a valid row
# with -inf classes; (B, T, V) without unit stride.
CASES = [
    "rows",
    "v1",
    "v2",
    "prime",
    "prime_long",
    "empty",
    "one",
    "offset",
    "ties",
    "nonfinite",
    "batched",
]


def _ref_grad(x64: torch.Tensor, y, T, g_lp, g_h) -> torch.Tensor:
    x64 = x64.detach().requires_grad_()
    lp, h = reference(x64, y, T, IGNORE)
    total = 0.0
    if g_lp is not None:
        total = total + (lp * g_lp).sum()
    if g_h is not None:
        total = total + (h * g_h).sum()
    (grad,) = torch.autograd.grad(total, x64)
    return grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_token_log_probs_matches_float64(name: str, dtype: torch.dtype) -> None:
    x, y, T = _case(name, dtype)
    if name == "prime_long" and dtype != torch.float32:
        pytest.skip("the two-sweep shape once (float32) keeps the interpreter's time small")
    x64 = x.double()
    ref_lp, ref_h = reference(x64, y, T, IGNORE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out_tol = TOL[acc] * (50 if name == "offset" else 1)
    g = _gen(1)
    g_lp = torch.randn(y.shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(y.shape, generator=g, dtype=torch.float64)

    # Both outputs, a random upstream gradient for each.
    leaf = x.detach().requires_grad_()
    lp, h = token_log_probs(leaf, y, temperature=T, return_entropy=True)
    assert lp.dtype == acc and h.dtype == acc and lp.shape == y.shape
    close(lp, ref_lp, out_tol, "logp")
    close(h, ref_h, out_tol, "entropy")
    ((lp * g_lp.to(acc)).sum() + (h * g_h.to(acc)).sum()).backward()
    assert leaf.grad.dtype == dtype and leaf.grad.shape == x.shape
    close(leaf.grad, _ref_grad(x64, y, T, g_lp, g_h), TOL[dtype], "grad (both)")
    ignored = (y == IGNORE)[..., None].expand(x.shape)
    assert (leaf.grad[ignored] == 0).all(), "ignored rows: exact zero gradient"

    # logp alone (return_entropy=False): the cross-entropy's gradient rows.
    leaf.grad = None
    lp = token_log_probs(leaf, y, temperature=T)
    close(lp, ref_lp, out_tol, "logp alone")
    (lp * g_lp.to(acc)).sum().backward()
    close(leaf.grad, _ref_grad(x64, y, T, g_lp, None), TOL[dtype], "grad (logp alone)")

    # The entropy alone receives a gradient.
    leaf.grad = None
    lp, h = token_log_probs(leaf, y, temperature=T, return_entropy=True)
    (h * g_h.to(acc)).sum().backward()
    close(leaf.grad, _ref_grad(x64, y, T, None, g_h), TOL[dtype], "grad (entropy alone)")

    # No gradient wanted: the same values.
    with torch.no_grad():
        lp2, h2 = token_log_probs(x, y, temperature=T, return_entropy=True)
    assert torch.equal(lp2, lp.detach()) and torch.equal(h2, h.detach())


# Why each: chunks of one row, an uneven split (4 rows into 10), the default chunking (one
# chunk here); a bias or none; V = 1; no rows.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("chunk_size", "bias", "V", "N"),
    [
        (1, True, 37, 10),
        (4, False, 37, 10),
        (None, True, 37, 10),
        (3, True, 1, 4),
        (2, True, 37, 0),
    ],
)
def test_linear_token_log_probs_matches_float64(chunk_size, bias, V, N, dtype) -> None:
    g = _gen(V + N)
    D, T = 8, 0.8
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(V, (N,), generator=g)
    y[::3] = IGNORE
    g_lp = torch.randn(N, generator=g, dtype=torch.float64)
    g_h = torch.randn(N, generator=g, dtype=torch.float64)
    # The operands as the dtype holds them; the reference on their float64 copies.
    xs, Ws = x.to(dtype), W.to(dtype)
    bs = b.to(dtype) if b is not None else None
    leaves = [t.detach().requires_grad_() for t in (xs, Ws) + ((bs,) if bias else ())]
    lp, h = linear_token_log_probs(
        leaves[0].reshape(2, N // 2, D) if N else leaves[0],
        leaves[1],
        y.reshape(2, N // 2) if N else y,
        linear_bias=leaves[2] if bias else None,
        temperature=T,
        chunk_size=chunk_size,
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Half-precision heads round their logits to the dtype (as F.linear would): the values
    # carry that rounding, on top of the float32 outputs' own.
    out_tol = TOL[dtype] if dtype in (torch.float16, torch.bfloat16) else TOL[acc] * 10
    refs = [t.double().detach().requires_grad_() for t in leaves]
    logits = refs[0] @ refs[1].t() + (refs[2] if bias else 0.0)
    ref_lp, ref_h = reference(logits, y, T, IGNORE)
    close(lp.reshape(-1), ref_lp.detach(), out_tol, "logp")
    close(h.reshape(-1), ref_h.detach(), out_tol, "entropy")
    ((lp.reshape(-1) * g_lp.to(acc)).sum() + (h.reshape(-1) * g_h.to(acc)).sum()).backward()
    ((ref_lp * g_lp).sum() + (ref_h * g_h).sum()).backward()
    # The GEMMs round their products in the dtype: half precision gets twice its tolerance.
    tol = TOL[dtype] * (2 if dtype in (torch.float16, torch.bfloat16) else 10)
    for got, ref, what in zip(
        leaves, refs, ("grad_input", "grad_weight", "grad_bias"), strict=False
    ):
        assert got.grad.dtype == dtype
        close(got.grad, ref.grad, tol, what)
    # Without the entropy: the cross-entropy's gradient rows, the same logp.
    for t in leaves:
        t.grad = None
    lp2 = linear_token_log_probs(
        leaves[0], leaves[1], y, linear_bias=leaves[2] if bias else None, temperature=T,
        return_entropy=False, chunk_size=chunk_size,
    )  # fmt: skip
    close(lp2, ref_lp.detach(), out_tol, "logp alone")
    (lp2 * g_lp.to(acc)).sum().backward()
    for t in refs:
        t.grad = None
    ref_lp2, _ = reference(refs[0] @ refs[1].t() + (refs[2] if bias else 0.0), y, T, IGNORE)
    (ref_lp2 * g_lp).sum().backward()
    for got, ref, what in zip(
        leaves, refs, ("grad_input", "grad_weight", "grad_bias"), strict=False
    ):
        close(got.grad, ref.grad, tol, what + " (logp alone)")


def test_linear_matches_the_logits_form_and_never_makes_n_by_v() -> None:
    """The head gives token_log_probs' numbers on the materialised logits, and its backward
    recomputes chunks: no (N, V) tensor is ever saved for backward."""
    g = _gen(3)
    x = torch.randn(64, 16, generator=g, requires_grad=True)
    W = torch.randn(301, 16, generator=g, requires_grad=True)
    y = torch.randint(301, (64,), generator=g)
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, h = linear_token_log_probs(x, W, y, temperature=1.5, chunk_size=16)
    assert max(sizes) < 64 * 301, sizes
    lp_ref, h_ref = token_log_probs(x @ W.t(), y, temperature=1.5, return_entropy=True)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        (lambda x, y: token_log_probs(x.long(), y), TypeError, "floating"),
        (lambda x, y: token_log_probs(x, y[:2]), ValueError, "does not fit"),
        (lambda x, y: token_log_probs(x, y.float()), TypeError, "int64"),
        (lambda x, y: token_log_probs(x, y, temperature=0.0), ValueError, "temperature"),
        (lambda x, y: token_log_probs(x, y, temperature=float("nan")), ValueError, "temperature"),
        (lambda x, y: token_log_probs(x, y, temperature=True), TypeError, "temperature"),
        (lambda x, y: token_log_probs(x, y, return_entropy=1), TypeError, "return_entropy"),
        (lambda x, y: token_log_probs(x, y, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda x, y: token_log_probs(x, y + 7), IndexError, "out of bounds"),
        (lambda x, y: token_log_probs(x[:, :0], y), ValueError, "V >= 1"),
        (lambda x, y: token_log_probs(x, y, process_group="g"), TypeError, "ProcessGroup"),
    ],
)
def test_token_log_probs_errors(call, exc, fragment) -> None:
    x, y = torch.randn(3, 7), torch.tensor([1, 2, 6])
    with pytest.raises(exc, match=fragment) as info:
        call(x, y)
    assert str(info.value).startswith("token_log_probs"), str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"W": torch.randn(7, 5)}, ValueError, "features"),
        ({"W": torch.randn(7, 4, dtype=torch.float64)}, TypeError, "same dtype"),
        ({"b": torch.randn(6)}, ValueError, "linear_bias"),
        ({"y": torch.tensor([0, 7, 1])}, IndexError, "out of bounds"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"temperature": -1.0}, ValueError, "temperature"),
    ],
)
def test_linear_token_log_probs_errors(kwargs, exc, fragment) -> None:
    a = {"x": torch.randn(3, 4), "W": torch.randn(7, 4), "y": torch.tensor([0, 1, 2])}
    a.update(kwargs)
    rest = {k: a[k] for k in ("chunk_size", "temperature") if k in a}
    with pytest.raises(exc, match=fragment) as info:
        linear_token_log_probs(a["x"], a["W"], a["y"], linear_bias=a.get("b"), **rest)
    assert str(info.value).startswith("linear_token_log_probs"), str(info.value)


def test_double_backward_raises() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    lp = token_log_probs(x, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), x, create_graph=True)


# --------------------------------------------------------------------------- torch.compile


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as every other element of a wider buffer (no unit stride)."""
    buf = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    buf[..., ::2] = t
    return buf[..., ::2]


def test_custom_ops_pass_opcheck() -> None:
    """Schemas, fakes (shapes, dtypes, contiguous strides) and autograd registrations agree with
    the real ops, on contiguous and strided inputs."""
    x = torch.randn(5, 9, dtype=torch.float32)
    y = torch.tensor([0, 8, IGNORE, 3, 4])
    for logits in (x, _strided(x)):
        for entropy in (False, True):
            args = (logits.detach().requires_grad_(), y, IGNORE, 0.5, entropy)
            torch.library.opcheck(tlp_module.token_log_probs_op, args)
    h = torch.randn(5, 4)
    W = _strided(torch.randn(9, 4))
    b = torch.randn(9)
    for entropy in (False, True):
        args = (h.requires_grad_(), W.requires_grad_(), b.requires_grad_(), y, IGNORE, 1.5)
        torch.library.opcheck(tlp_module.linear_token_log_probs_op, (*args, entropy, 2))
    # The backward ops, with an entropy gradient or without.
    _, _, stats = tlp_module.token_log_probs_op(x, y, IGNORE, 0.5, True)
    g = torch.randn(2, 5)
    for g_h in (None, g[1]):
        args = (_strided(x), y, stats, g[0], g_h, IGNORE, 0.5)
        torch.library.opcheck(tlp_module._token_log_probs_backward_op, args)
    _, _, stats = tlp_module.linear_token_log_probs_op(h, W, b, y, IGNORE, 1.5, True, 2)
    for needs in ([True, True, True], [False, True, False]):
        args = (h.detach(), W.detach(), b.detach(), y, stats.detach(), g[0], g[1], IGNORE, 1.5)
        args = (*args, 2, needs)
        torch.library.opcheck(tlp_module._linear_token_log_probs_backward_op, args)


def test_compile_fullgraph_matches_eager() -> None:
    """One compiled GRPO-like step through both functions (fullgraph: no graph break): the
    eager values and gradients."""
    g = _gen(5)
    logits = torch.randn(2, 4, 23, generator=g)
    h = torch.randn(2, 4, 8, generator=g)
    W = torch.randn(23, 8, generator=g)
    y = torch.randint(23, (2, 4), generator=g)
    y[1, 2] = IGNORE
    adv = torch.randn(2, 4, generator=g)

    def step(logits, h, W):
        lp, ent = token_log_probs(logits, y, temperature=0.9, return_entropy=True)
        lp2, ent2 = linear_token_log_probs(h, W, y, temperature=0.9, chunk_size=3)
        return -(lp * adv).sum() - 0.01 * ent.sum() - (lp2.exp() * adv).sum() + ent2.mean()

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (_strided(logits), h, W)]
        loss = fn(*leaves)
        loss.backward()
        outs.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_exported_from_the_package() -> None:
    assert fusedce.token_log_probs is token_log_probs
    assert fusedce.linear_token_log_probs is linear_token_log_probs


def test_backward_takes_the_cross_entropy_rows_unless_the_entropy_has_a_gradient(
    monkeypatch,
) -> None:
    """Where only logp receives a gradient, backward is the cross-entropy's gradient launch
    (``core.gradient_from_stats``); the extra pass runs only for an entropy gradient."""
    from fusedce import core
    from fusedce.log_probs import rows as log_prob_rows

    counts = {"ce": 0, "extra": 0}
    ce_rows = core.gradient_from_stats
    monkeypatch.setattr(
        core,
        "gradient_from_stats",
        lambda *a, **k: (counts.__setitem__("ce", counts["ce"] + 1), ce_rows(*a, **k))[1],
    )
    torch_rows = log_prob_rows._torch_grad_rows
    monkeypatch.setattr(
        log_prob_rows,
        "_torch_grad_rows",
        lambda *a: (counts.__setitem__("extra", counts["extra"] + 1), torch_rows(*a))[1],
    )
    if log_prob_rows.triton_log_probs is not None:
        triton_rows = log_prob_rows.triton_log_probs.log_prob_grad_rows
        monkeypatch.setattr(
            log_prob_rows.triton_log_probs,
            "log_prob_grad_rows",
            lambda *a: (counts.__setitem__("extra", counts["extra"] + 1), triton_rows(*a))[1],
        )
    x = torch.randn(4, 9, requires_grad=True)
    y = torch.tensor([0, 1, IGNORE, 8])
    lp, h = token_log_probs(x, y, return_entropy=True)
    lp.sum().backward()
    assert counts == {"ce": 1, "extra": 0}, counts
    lp, h = token_log_probs(x, y, return_entropy=True)
    (lp.sum() + h.sum()).backward()
    assert counts == {"ce": 1, "extra": 1}, counts


def test_linear_under_autocast_runs_in_the_autocast_dtype() -> None:
    """As F.linear would: float32 operands under a bfloat16 autocast give the bfloat16 head's
    numbers, and float32 gradients for the float32 leaves."""
    g = _gen(9)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    W = torch.randn(11, 8, generator=g, requires_grad=True)
    y = torch.randint(11, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, h = linear_token_log_probs(x, W, y)
    (lp.sum() + h.sum()).backward()
    ref_lp, ref_h = linear_token_log_probs(x.detach().bfloat16(), W.detach().bfloat16(), y)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(h, ref_h)
    assert x.grad.dtype == torch.float32 and W.grad.dtype == torch.float32


# bfloat16 only: the training dtype, and each dtype compiles functions of its own (seconds).
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_large_cpu_blocks_take_the_compiled_rows(dtype) -> None:
    """Blocks of at least ``MIN_BLOCK_LOGITS`` logits on the torch backend's CPU path: the
    Inductor-compiled entropy and gradient rows give the float64 reference's numbers (values,
    both gradients, ignored NaN rows, -inf classes, a temperature), in place in the head too."""
    from fusedce.backends import cpu_compiled_log_probs as compiled

    g = _gen(11)
    V = 4099  # 9 rows: just above MIN_BLOCK_LOGITS
    x = (torch.randn(9, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[2] = float("nan")
    x[4, ::3] = float("-inf")
    y = torch.randint(V, (9,), generator=g)
    y[2] = IGNORE
    g_lp, g_h = torch.randn(2, 9, generator=g, dtype=torch.float64)
    with fusedce.use_backend("torch"):
        assert compiled.applies(x)
        leaf = x.clone().requires_grad_()
        lp, h = token_log_probs(leaf, y, temperature=0.8, return_entropy=True)
        ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
        ref_lp, ref_h = reference(x.double(), y, 0.8, IGNORE)
        close(lp, ref_lp, TOL[torch.float32], "logp")
        close(h, ref_h, TOL[torch.float32], "entropy")
        close(leaf.grad, _ref_grad(x.double(), y, 0.8, g_lp, g_h), TOL[dtype], "grad")
        # The head writes each chunk's gradient over its logits: the in-place variant.
        hx = torch.randn(9, 16, generator=g).to(dtype).requires_grad_()
        W = torch.randn(V, 16, generator=g).to(dtype).requires_grad_()
        lp, h = linear_token_log_probs(hx, W, y, chunk_size=9)
        (lp * g_lp.float() + h * g_h.float()).sum().backward()
        refs = [t.detach().double().requires_grad_() for t in (hx, W)]
        r_lp, r_h = reference(refs[0] @ refs[1].t(), y, 1.0, IGNORE)
        ((r_lp * g_lp).sum() + (r_h * g_h).sum()).backward()
        tol = TOL[dtype] * (2 if dtype == torch.bfloat16 else 10)
        close(hx.grad, refs[0].grad, tol, "head grad_input")
        close(W.grad, refs[1].grad, tol, "head grad_weight")


def test_torch_func_transforms() -> None:
    """Under torch.func (grad, vmap) the definitions run as differentiable torch ops: the
    eager gradients, and vmap over a batch of calls equals the batched call."""
    g = _gen(13)
    x = torch.randn(3, 5, 11, generator=g)
    y = torch.randint(11, (3, 5), generator=g)
    y[0, 1] = IGNORE
    W = torch.randn(11, 4, generator=g)
    h = torch.randn(3, 5, 4, generator=g)

    def objective(x):
        lp, ent = token_log_probs(x, y, temperature=0.6, return_entropy=True)
        return (lp * 0.5 - ent).sum()

    leaf = x.clone().requires_grad_()
    objective(leaf).backward()
    torch.testing.assert_close(torch.func.grad(objective)(x), leaf.grad)
    batched = torch.func.vmap(lambda a, b: token_log_probs(a, b, return_entropy=True))(x, y)
    direct = token_log_probs(x, y, return_entropy=True)
    for a, b in zip(batched, direct, strict=True):
        torch.testing.assert_close(a, b)

    def head(W):
        lp, ent = linear_token_log_probs(h, W, y, temperature=0.6)
        return (lp - 0.1 * ent).sum()

    leaf = W.clone().requires_grad_()
    head(leaf).backward()
    torch.testing.assert_close(torch.func.grad(head)(W), leaf.grad, rtol=1e-5, atol=1e-6)
