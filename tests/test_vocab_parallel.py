"""``fusedce.vocab_parallel`` on real process groups: 2 and 3 CPU processes over gloo.

Spawning is slow, so each world size runs ONE set of processes that checks every case in turn
(``_worker``); a failed check raises in that process and fails the test with its traceback.
Every rank builds the same full logits / weights from one seed, computes the float64 reference
of the UNSHARDED loss and gradients with torch, and compares its own slice.
"""

from __future__ import annotations

import datetime
import faulthandler
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedce
import fusedce.sharded.slices
from ce_reference import extras_float64_loss
from fusedce import backends, core
from fusedce.vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

V = 1001  # uneven over 2 and over 3 ranks
N = 8
IGNORE = -100
# Relative tolerance of each dtype's gradient (it is written in the logits' dtype).
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# --------------------------------------------------------------------------------------------
# Helpers run inside the worker processes
# --------------------------------------------------------------------------------------------


def _even_widths(world: int, vocab: int = V) -> list[int]:
    return [len(c) for c in torch.arange(vocab).chunk(world)]


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    torch.testing.assert_close(
        got.double(), ref, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}"
    )


def _data(seed: int, shape_in: tuple[int, ...], soft: bool, ignore_index: int = IGNORE):
    """Full float64 logits (class dim 1, or 0 for 1-D), targets and class weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape_in, generator=g, dtype=torch.float64) * 3
    class_dim = 1 if len(shape_in) > 1 else 0
    vocab = shape_in[class_dim]
    if soft:
        target = torch.randn(shape_in, generator=g, dtype=torch.float64).softmax(class_dim)
    else:
        tshape = shape_in[:1] + shape_in[2:] if class_dim else ()
        target = torch.randint(vocab, tshape, generator=g)
        if target.dim():
            target.view(-1)[::3] = ignore_index  # some ignored rows
    weight = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1
    return logits, target, weight


def _check_cross_entropy(
    rank: int,
    widths: list[int],
    shape_in: tuple[int, ...],
    dtype: torch.dtype,
    soft: bool,
    reduction: str,
    use_weight: bool,
    eps: float,
    ignore_index: int = IGNORE,
    explicit: bool = False,
    seed: int = 0,
) -> None:
    logits, target, weight = _data(seed, shape_in, soft, ignore_index)
    logits = logits.to(dtype).double()  # the reference sees the same rounded logits
    w = weight if use_weight else None
    class_dim = 1 if logits.dim() > 1 else 0
    start = sum(widths[:rank])
    cols = slice(start, start + widths[rank])
    idx = (slice(None), cols) if class_dim else (cols,)

    ref_in = logits.clone().requires_grad_()
    ref_t = target.clone().requires_grad_(soft)
    ref = F.cross_entropy(
        ref_in, ref_t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps
    )
    (
        ref * torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
    ).sum().backward()

    local = logits[idx].to(dtype).clone().requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    local_t = target[idx].clone().requires_grad_() if soft else target
    sizes = {"vocab_start": start, "vocab_size": sum(widths)} if explicit else {}
    loss = vocab_parallel_cross_entropy(
        local,
        local_t,
        w.to(acc) if w is not None else None,
        ignore_index,
        reduction,
        eps,
        process_group=dist.group.WORLD,
        **sizes,
    )
    what = f"{dtype} soft={soft} {reduction} w={use_weight} eps={eps} shape={shape_in}"
    assert loss.dtype == acc and loss.shape == ref.shape, what
    factor = torch.linspace(0.5, 1.5, loss.numel(), dtype=acc).reshape(loss.shape)
    (loss * factor).sum().backward()
    _close(loss, ref.detach(), 1e-10 if dtype == torch.float64 else 1e-5, f"loss {what}")
    # The very same loss on every rank (not merely close).
    losses: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss.detach())
    assert all(torch.equal(other, loss.detach()) for other in losses), what
    _close(local.grad, ref_in.grad[idx], GRAD_TOL[dtype], f"grad {what}")
    if soft:
        _close(local_t.grad, ref_t.grad[idx], 1e-5, f"target grad {what}")


def _check_linear(
    rank: int,
    widths: list[int],
    dtype: torch.dtype,
    reduction: str,
    use_weight: bool,
    eps: float,
    bias: bool,
    lead_shape: tuple[int, ...] = (N,),
    chunk_size: int | None = 3,
) -> None:
    D = 7
    g = torch.Generator().manual_seed(1)
    vocab = sum(widths)
    x = (torch.randn(*lead_shape, D, generator=g, dtype=torch.float64)).to(dtype)
    W = (torch.randn(vocab, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(vocab, lead_shape, generator=g)
    target.view(-1)[::4] = IGNORE
    w = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1 if use_weight else None

    xr, Wr, br = (t.double().clone().requires_grad_() for t in (x, W, b))
    ref = F.cross_entropy(
        F.linear(xr, Wr, br if bias else None).reshape(-1, vocab),
        target.reshape(-1),
        w,
        reduction=reduction,
        label_smoothing=eps,
    )
    ref.sum().backward()

    rows = slice(sum(widths[:rank]), sum(widths[: rank + 1]))
    xl = x.clone().requires_grad_()
    Wl = W[rows].clone().requires_grad_()
    bl = b[rows].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(
        xl,
        Wl,
        target,
        linear_bias=bl if bias else None,
        weight=w,
        reduction=reduction,
        label_smoothing=eps,
        chunk_size=chunk_size,
        process_group=dist.group.WORLD,
    )
    loss.sum().backward()
    what = f"linear {dtype} {reduction} w={use_weight} eps={eps} bias={bias} {lead_shape}"
    assert loss.shape == tuple(lead_shape) if reduction == "none" else loss.dim() == 0, what
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    _close(loss.reshape(-1), ref.detach().reshape(-1), tol, f"loss {what}")
    _close(xl.grad, xr.grad, tol, f"input grad {what}")
    _close(Wl.grad, Wr.grad[rows], tol, f"weight grad {what}")
    if bias:
        _close(bl.grad, br.grad[rows], tol, f"bias grad {what}")


# The one-pass extras, alone and together ("token_weight": True draws random token weights).
EXTRA_SETS = (
    {"logit_scale": 0.7},
    {"softcap": 5.0},
    {"z_loss": 1e-3},
    {"token_weight": True},
    {},  # return_stats alone
    {"logit_scale": 1.3, "softcap": 4.0, "z_loss": 2e-3, "token_weight": True},
)
ALL_EXTRAS = EXTRA_SETS[-1]
# A scale and a z-loss at an offset of 1e8: the z-loss term is large there, and shift-exact
# arithmetic must keep the cross-entropy part exact beside it.
SCALED = {"logit_scale": 0.5, "z_loss": 1e-6}


def _token_weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    tw = torch.rand(shape, generator=g, dtype=torch.float64) * 2
    if tw.dim():
        tw.view(-1)[::5] = 0.0  # some zero weights
    return tw


def _close_stats(got, ref, tol: float, what: str) -> None:
    _close(got.z_loss, ref.z_loss.detach(), tol, f"stats.z_loss {what}")
    _close(got.lse, ref.lse, tol, f"stats.lse {what}")
    _close(got.entropy, ref.entropy, tol, f"stats.entropy {what}")
    assert torch.equal(got.correct, ref.correct), f"stats.correct {what}"
    assert got.correct.dtype == torch.bool and not got.lse.requires_grad, what


def _check_extras(
    rank: int,
    widths: list[int],
    extras: dict,
    dtype: torch.dtype = torch.float32,
    soft: bool = False,
    reduction: str = "mean",
    shape_in: tuple[int, ...] = (N, V),
    use_weight: bool = True,
    eps: float = 0.1,
    return_stats: bool = True,
    seed: int = 11,
) -> None:
    """fusedce.cross_entropy(slice, process_group=) with the extras against the unsharded
    fusedce.cross_entropy of the full logits in float64: loss, gradients and statistics."""
    logits, target, weight = _data(seed, shape_in, soft)
    logits = logits.to(dtype).double()
    class_dim = 1 if logits.dim() > 1 else 0
    if not soft and target.dim():
        # Some rows whose class is the argmax, so that `correct` is True somewhere.
        target.view(-1)[1::3] = logits.argmax(class_dim).reshape(-1)[1::3]
    out_shape = tuple(logits.shape[:class_dim]) + tuple(logits.shape[class_dim + 1 :])
    opts = dict(extras)
    if opts.get("token_weight"):
        opts["token_weight"] = _token_weights(out_shape, seed)
    w = weight if use_weight else None
    start = sum(widths[:rank])
    cols = slice(start, start + widths[rank])
    idx = (slice(None), cols) if class_dim else (cols,)

    ref_in = logits.clone().requires_grad_()
    ref_t = target.clone().requires_grad_(soft)
    ref, ref_stats = fusedce.cross_entropy(
        ref_in, ref_t, w, IGNORE, reduction, eps, **opts, return_stats=True
    )
    factor = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    (ref * factor).sum().backward()

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    local = logits[idx].to(dtype).clone().requires_grad_()
    local_t = target[idx].clone().requires_grad_() if soft else target
    mine = {k: (v.to(acc) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    out = fusedce.cross_entropy(
        local,
        local_t,
        w.to(acc) if w is not None else None,
        IGNORE,
        reduction,
        eps,
        **mine,
        return_stats=return_stats,
        process_group=dist.group.WORLD,
    )
    loss, stats = out if return_stats else (out, None)
    what = f"extras {extras} {dtype} soft={soft} {reduction} shape={shape_in} widths={widths}"
    assert isinstance(loss, torch.Tensor) and loss.dtype == acc, what
    assert loss.shape == ref.shape, what
    (loss * factor.to(acc)).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _close(loss, ref.detach(), tol, f"loss {what}")
    _close(local.grad, ref_in.grad[idx], GRAD_TOL[dtype], f"grad {what}")
    if soft:
        _close(local_t.grad, ref_t.grad[idx], 1e-5, f"target grad {what}")
    if stats is not None:
        _close_stats(stats, ref_stats, tol, what)
        # Identical on every rank.
        gathered: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [loss.detach(), *stats])
        assert all(
            all(torch.equal(a, b) for a, b in zip(other, gathered[0], strict=True))
            for other in gathered
        ), what


def _check_argmax_ties(rank: int, widths: list[int]) -> None:
    """`correct` resolves ties of the maximum across slices toward the lowest global class, as
    torch.argmax: rows whose maximum appears in several slices."""
    vocab = sum(widths)
    starts = [sum(widths[:r]) for r in range(len(widths)) if widths[r]]
    lo, hi = starts[0], starts[-1] + 1  # in the first and the last non-empty slice
    logits = torch.zeros(6, vocab, dtype=torch.float64)
    logits[:, lo] = logits[:, hi] = 4.0
    logits[3:, lo] = 3.0  # rows 3..5: the maximum is in the last slice alone
    hard = torch.tensor([lo, hi, 0, lo, hi, 1])
    soft = torch.full((6, vocab), 0.1 / vocab, dtype=torch.float64)
    soft[:, lo] = soft[:, hi] = 0.5  # a tie in the target too: its argmax is `lo`
    soft[1::2, lo] = 0.2
    cols = slice(sum(widths[:rank]), sum(widths[: rank + 1]))
    for target, local_t in ((hard, hard), (soft, soft[:, cols])):
        _, ref = fusedce.cross_entropy(logits, target, reduction="none", return_stats=True)
        _, got = fusedce.cross_entropy(
            logits[:, cols].float(),
            local_t.float() if local_t.is_floating_point() else local_t,
            reduction="none",
            return_stats=True,
            process_group=dist.group.WORLD,
        )
        assert torch.equal(got.correct, ref.correct), (got.correct, ref.correct)
    assert ref.correct.tolist() != [False] * 6 and ref.correct.tolist() != [True] * 6


def _check_linear_extras(
    rank: int,
    widths: list[int],
    extras: dict,
    dtype: torch.dtype,
    reduction: str,
    return_stats: bool = True,
) -> None:
    """fusedce.linear_cross_entropy(x, W slice, process_group=) with the extras against the
    unsharded fused head in float64."""
    D = 7
    g = torch.Generator().manual_seed(2)
    vocab = sum(widths)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(vocab, D, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(vocab, (N,), generator=g)
    target[::4] = IGNORE
    target[1::4] = F.linear(x.double(), W.double(), b.double()).argmax(1)[1::4]
    w = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1
    opts = dict(extras)
    if opts.get("token_weight"):
        opts["token_weight"] = _token_weights((N,), 2)

    xr, Wr, br = (t.double().clone().requires_grad_() for t in (x, W, b))
    # The reference: the unsharded cross-entropy of the float64 logits.
    ref, ref_stats = fusedce.cross_entropy(
        F.linear(xr, Wr, br),
        target,
        w,
        reduction=reduction,
        label_smoothing=0.1,
        **opts,
        return_stats=True,
    )
    factor = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    (ref * factor).sum().backward()

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = slice(sum(widths[:rank]), sum(widths[: rank + 1]))
    xl = x.clone().requires_grad_()
    Wl = W[rows].clone().requires_grad_()
    bl = b[rows].clone().requires_grad_()
    mine = {k: (v.to(acc) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    out = fusedce.linear_cross_entropy(
        xl,
        Wl,
        target,
        linear_bias=bl,
        weight=w.to(acc),
        reduction=reduction,
        label_smoothing=0.1,
        chunk_size=3,
        **mine,
        return_stats=return_stats,
        process_group=dist.group.WORLD,
    )
    loss, stats = out if return_stats else (out, None)
    (loss * factor.to(acc)).sum().backward()
    what = f"linear extras {extras} {dtype} {reduction} widths={widths}"
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    _close(loss, ref.detach(), tol, f"loss {what}")
    _close(xl.grad, xr.grad, tol, f"input grad {what}")
    _close(Wl.grad, Wr.grad[rows], tol, f"weight grad {what}")
    _close(bl.grad, br.grad[rows], tol, f"bias grad {what}")
    if stats is not None and dtype != torch.bfloat16:
        _close_stats(stats, ref_stats, tol, what)


def _check_all_extras(rank: int, world: int, widths: list[int], skewed: list[int]) -> None:
    for extras in EXTRA_SETS:
        _check_extras(rank, widths, extras)
        _check_extras(rank, widths, extras, soft=True, reduction="sum")
    for reduction in ("none", "mean", "sum"):
        _check_extras(rank, widths, ALL_EXTRAS, reduction=reduction, use_weight=False, eps=0.0)
    _check_extras(rank, widths, ALL_EXTRAS, torch.float64, reduction="none")
    _check_extras(rank, widths, ALL_EXTRAS, torch.float64, soft=True)
    _check_extras(rank, widths, ALL_EXTRAS, torch.bfloat16, reduction="sum")
    _check_extras(rank, widths, ALL_EXTRAS, torch.bfloat16, soft=True, reduction="none")
    _check_extras(rank, widths, ALL_EXTRAS, shape_in=(3, V, 4), reduction="none")
    _check_extras(rank, widths, ALL_EXTRAS, shape_in=(V,), reduction="sum")
    _check_extras(rank, widths, ALL_EXTRAS, return_stats=False)
    _check_extras(rank, skewed, ALL_EXTRAS, reduction="none")
    _check_extras(rank, skewed, ALL_EXTRAS, soft=True)
    _check_argmax_ties(rank, widths)
    _check_argmax_ties(rank, skewed)
    for dtype, reduction in ((torch.float32, "mean"), (torch.float64, "none")):
        _check_linear_extras(rank, widths, ALL_EXTRAS, dtype, reduction)
    _check_linear_extras(rank, widths, {"softcap": 3.0}, torch.bfloat16, "sum")
    _check_linear_extras(rank, skewed, ALL_EXTRAS, torch.float32, "sum", return_stats=False)


def _collectives(fn) -> tuple[dict[str, int], dict[str, int]]:
    """Collectives issued by ``fn()`` (forward) and by the backward of what it returns, read
    from the profiler's record of the gloo calls."""

    def count(prof) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in prof.events():
            if e.name.startswith("gloo:"):
                out[e.name] = out.get(e.name, 0) + 1
        return out

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as fwd:
        loss = fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as bwd:
        loss.backward()
    return count(fwd), count(bwd)


def _expect_same_error(rank: int, world: int, exc: type[Exception], fragment: str, fn) -> None:
    """``fn`` raises ``exc`` on EVERY rank, with the same message (no rank left waiting)."""
    try:
        fn()
    except exc as e:
        message = str(e)
    else:
        raise AssertionError(f"rank {rank}: expected {exc.__name__} ({fragment})")
    assert fragment in message, message
    messages: list[object] = [None] * world
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, messages


def _check_errors(rank: int, world: int) -> None:
    logits, target, weight = _data(0, (N, V), soft=False)
    widths = _even_widths(world)
    start = sum(widths[:rank])
    local = logits[:, start : start + widths[rank]].float()
    vpce = vocab_parallel_cross_entropy

    # Ranks disagree on the number of rows.
    rows = N - 1 if rank == 0 else N
    _expect_same_error(
        rank, world, ValueError, "number of rows", lambda: vpce(local[:rows], target[:rows])
    )
    # A class index out of range (the same target everywhere).
    bad = target.clone()
    bad[1] = V
    _expect_same_error(
        rank, world, IndexError, f"index {V} is out of bounds", lambda: vpce(local, bad)
    )
    # One rank's target differs.
    other = target.clone()
    other[2] = (int(target[2]) + 1) % V if rank == world - 1 else target[2]
    _expect_same_error(rank, world, ValueError, "differs across ranks", lambda: vpce(local, other))
    # One rank's class weights are not the full (V,) vector.
    w = weight.float() if rank == 0 else weight.float()[start : start + widths[rank]]
    _expect_same_error(
        rank, world, ValueError, "number of class weights", lambda: vpce(local, target, w)
    )
    # One rank's target has a wrong shape: its own check, raised on every rank.
    t_bad = target[:-1] if rank == 1 else target
    _expect_same_error(
        rank, world, ValueError, f"rank 1 of {world} rejected", lambda: vpce(local, t_bad)
    )
    # A non-tensor on one rank.
    arg = "oops" if rank == 0 else local
    _expect_same_error(rank, world, TypeError, "rank 0 of", lambda: vpce(arg, target))
    # The linear head: ranks disagree on D.
    D = 4 + (rank == 0)
    _expect_same_error(
        rank,
        world,
        ValueError,
        "number of input features",
        lambda: vocab_parallel_linear_cross_entropy(
            torch.randn(N, D), torch.randn(widths[rank], D), target
        ),
    )
    # Explicit sizes: a bad (replicated) index still raises on every rank (the sizes are checked
    # in the same exchange).
    _expect_same_error(
        rank,
        world,
        IndexError,
        "out of bounds",
        lambda: vpce(local, bad, vocab_start=start, vocab_size=V),
    )
    # The ranks disagree on an extra, or on the (replicated) token weights.
    cap = 5.0 if rank == 0 else 6.0
    _expect_same_error(
        rank, world, ValueError, "disagree on the softcap", lambda: vpce(local, target, softcap=cap)
    )
    stats = rank == world - 1
    _expect_same_error(
        rank, world, ValueError, "return_stats", lambda: vpce(local, target, return_stats=stats)
    )
    tw = torch.ones(N)
    tw[0] = 1.0 + rank
    _expect_same_error(
        rank,
        world,
        ValueError,
        "token_weight differs",
        lambda: vpce(local, target, token_weight=tw),
    )
    # A bad extra on one rank.
    scale = -1.0 if rank == 1 else 1.0
    _expect_same_error(
        rank, world, ValueError, "logit_scale", lambda: vpce(local, target, logit_scale=scale)
    )
    # The group is still in step: a good call after all those errors.
    ref = F.cross_entropy(logits, target)
    _close(vpce(local, target), ref, 1e-5, "after errors")


def _check_dtensor(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    cases = [
        ((N, V), Shard(1), "mean", True),
        ((N, V), Shard(-1), "sum", False),
        ((N, V), Shard(1), "none", True),
        ((3, V, 4), Shard(1), "mean", False),
    ]
    for shape, placement, reduction, use_weight in cases:
        full, target, weight = _data(3, shape, soft=False)
        full = full.float()
        w = weight.float() if use_weight else None
        if use_weight:  # torch's loss_parallel backward cannot gather the weight of an ignored row
            target = target.clamp(min=0)
        ours_in = distribute_tensor(full, mesh, [placement]).requires_grad_()
        ref_in = distribute_tensor(full, mesh, [placement]).requires_grad_()
        loss = vocab_parallel_cross_entropy(ours_in, target, w, reduction=reduction)
        loss.sum().backward()
        with loss_parallel():
            ref = F.cross_entropy(ref_in, target, w, reduction=reduction)
            ref.sum().backward()
        what = f"DTensor {shape} {placement} {reduction}"
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), what
        assert tuple(loss.shape) == tuple(ref.shape), what
        assert isinstance(ours_in.grad, DTensor), what
        assert ours_in.grad.placements == ref_in.grad.placements, what
        _close(loss.to_local(), ref.to_local().double(), 1e-5, what)
        _close(ours_in.grad.to_local(), ref_in.grad.to_local().double(), 1e-5, f"grad {what}")
        # And against the float64 reference of the unsharded loss.
        f64 = F.cross_entropy(
            full.double(), target, weight if use_weight else None, reduction=reduction
        )
        _close(loss.full_tensor(), f64, 1e-5, f"f64 {what}")


def _check_dtensor_extras(rank: int, world: int) -> None:
    """DTensor logits with the extras (stats as replicated DTensors), and a DTensor (V, D)
    weight sharded Shard(0) for the linear head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full, target, weight = _data(4, (N, V), soft=False)
    tw = _token_weights((N,), 4)
    opts = {"logit_scale": 1.3, "softcap": 4.0, "z_loss": 2e-3}
    ref_in = full.clone().requires_grad_()
    ref, ref_stats = fusedce.cross_entropy(
        ref_in, target, weight, **opts, token_weight=tw, return_stats=True
    )
    ref.backward()
    d = distribute_tensor(full.float(), mesh, [Shard(1)]).requires_grad_()
    loss, stats = fusedce.cross_entropy(
        d, target, weight.float(), **opts, token_weight=tw.float(), return_stats=True
    )
    loss.backward()
    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
    assert all(isinstance(t, DTensor) for t in stats)
    _close(loss.full_tensor(), ref.detach(), 1e-5, "DTensor extras loss")
    _close(d.grad.full_tensor(), ref_in.grad, 1e-5, "DTensor extras grad")
    _close_stats(type(stats)(*(t.full_tensor() for t in stats)), ref_stats, 1e-5, "DTensor")

    # The linear head: a DTensor weight sharded by rows, replicated input and target.
    g = torch.Generator().manual_seed(6)
    h = torch.randn(N, 6, generator=g, dtype=torch.float64)
    W = torch.randn(V, 6, generator=g, dtype=torch.float64)
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = fusedce.cross_entropy(F.linear(hr, Wr), target, **opts)
    ref.backward()
    hl = h.float().requires_grad_()
    Wd = distribute_tensor(W.float(), mesh, [Shard(0)]).requires_grad_()
    loss = fusedce.linear_cross_entropy(hl, Wd, target, **opts)
    loss.backward()
    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
    assert isinstance(Wd.grad, DTensor) and Wd.grad.placements == (Shard(0),)
    _close(loss.full_tensor(), ref.detach(), 1e-5, "DTensor linear loss")
    _close(hl.grad, hr.grad, 1e-5, "DTensor linear input grad")
    _close(Wd.grad.full_tensor(), Wr.grad, 1e-5, "DTensor linear weight grad")
    with pytest.raises(ValueError, match="Shard"):
        fusedce.linear_cross_entropy(hl, distribute_tensor(W.float(), mesh, [Shard(1)]), target)


def _check_group_of_one(rank: int, world: int) -> None:
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    mine = groups[rank]
    logits, target, weight = _data(5, (N, 37), soft=False)
    x = logits.float()
    for reduction in ("mean", "none"):
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        got = vocab_parallel_cross_entropy(
            a, target, weight.float(), reduction=reduction, label_smoothing=0.1, process_group=mine
        )
        ref = fusedce.cross_entropy(
            b, target, weight.float(), reduction=reduction, label_smoothing=0.1
        )
        got.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    tw = _token_weights((N,), 5).float()
    opts = {"logit_scale": 0.5, "softcap": 3.0, "z_loss": 1e-3, "token_weight": tw}
    got, got_stats = vocab_parallel_cross_entropy(
        a, target, **opts, return_stats=True, process_group=mine
    )
    ref, ref_stats = fusedce.cross_entropy(b, target, **opts, return_stats=True)
    got.backward()
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert all(torch.equal(u, v) for u, v in zip(got_stats, ref_stats, strict=True))
    h, W = torch.randn(N, 5), torch.randn(37, 5)
    torch.testing.assert_close(
        vocab_parallel_linear_cross_entropy(h, W, target, process_group=mine),
        fusedce.linear_cross_entropy(h, W, target),
        rtol=0,
        atol=0,
    )


def _check_public_entry_points(rank: int, widths: list[int]) -> None:
    """fusedce.cross_entropy / linear_cross_entropy with process_group=, and with a DTensor
    input, are the vocabulary-parallel functions; options the sharded loss lacks are refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    logits, target, weight = _data(7, (N, V), soft=False)
    start = sum(widths[:rank])
    cols = slice(start, start + widths[rank])
    x = logits[:, cols].float()
    w = weight.float()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = fusedce.cross_entropy(a, target, w, label_smoothing=0.1, process_group=dist.group.WORLD)
    ref = vocab_parallel_cross_entropy(b, target, w, label_smoothing=0.1)
    got.backward()
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = logits.float()
    d = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
    loss = fusedce.cross_entropy(d, target, w)
    loss.backward()
    f64 = F.cross_entropy(full.double(), target, weight)
    _close(loss.full_tensor(), f64, 1e-5, "fusedce.cross_entropy(DTensor)")

    h = torch.randn(N, 6, generator=torch.Generator().manual_seed(1))
    W = torch.randn(V, 6, generator=torch.Generator().manual_seed(2))[cols]
    torch.testing.assert_close(
        fusedce.linear_cross_entropy(h, W, target, process_group=dist.group.WORLD),
        vocab_parallel_linear_cross_entropy(h, W, target),
        rtol=0,
        atol=0,
    )
    # The options without a sharded meaning are refused by name (the one-pass extras work).
    with pytest.raises(NotImplementedError, match="inplace_backward"):
        fusedce.cross_entropy(
            x.clone(), target, inplace_backward=True, process_group=dist.group.WORLD
        )
    with pytest.raises(NotImplementedError, match="accumulation"):
        fusedce.linear_cross_entropy(
            h, W, target, accumulation="input", process_group=dist.group.WORLD
        )


# (backend, grad_only) of every launch of the row contract, recorded by _record_launches.
_LAUNCHES: list[tuple[str, bool]] = []


def _record_launches() -> None:
    """Makes ``fusedce.core.run_rows`` (still the real function) record each launch."""
    real = core.run_rows

    def run_rows(
        logits, target, weight, opts, stats, grad=None, scale=None, grad_only=False, tw=None
    ):
        per_row = scale is not None and scale.dim() == 1
        chosen = backends.select(logits, target, weight, grad, per_row, grad_only)
        _LAUNCHES.append((chosen.name, grad_only))
        real(logits, target, weight, opts, stats, grad, scale, grad_only, tw)

    core.run_rows = run_rows


def _launches(fn) -> tuple[list[tuple[str, bool]], object]:
    """The row-contract launches of ``fn()``, and what it returned."""
    _LAUNCHES.clear()
    value = fn()
    return list(_LAUNCHES), value


def _expected_backend(dtype: torch.dtype) -> str:
    """The backend of the slices' launches: the Triton kernel under the interpreter (unless
    FUSEDCE_BACKEND=torch), else the torch backend; float64 always the torch backend."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernel_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    return (
        "triton" if interpreted and kernel_dtype and fusedce.get_backend() != "torch" else "torch"
    )


def _check_rows(rank: int, widths: list[int], on_rows: bool) -> None:
    """Class indices without smoothing or stats: the slice's loss takes ONE forward launch of
    the row contract and its gradient ONE gradient-only launch (the torch ops where
    ``on_rows`` is off), with the extras that map (logit scale, softcap, z-loss, token weights)
    and slices whose rows are partly or wholly -inf; the float64 reference of the unsharded
    loss. Then a slice where every class is some row's target: the gradient falls back to the
    torch ops (a zero class weight frees a class again)."""
    vocab = sum(widths)
    start = sum(widths[:rank])
    cols = slice(start, start + widths[rank])
    last = len(widths) - 1
    cases = (
        (torch.float32, "mean", True, {}),
        (torch.bfloat16, "none", False, {}),
        (torch.float64, "sum", True, {}),
        (torch.float32, "mean", True, ALL_EXTRAS),
        (torch.bfloat16, "none", True, {"z_loss": 1e-3, "token_weight": True}),
        (torch.float32, "sum", False, {"logit_scale": 0.7}),
        (torch.float64, "none", False, {"softcap": 3.0, "token_weight": True}),
    )
    for dtype, reduction, use_weight, extras in cases:
        logits, target, weight = _data(12, (N, vocab), soft=False)
        logits[:, -3:] = float("-inf")  # a padded vocabulary
        target = torch.where(target >= vocab - 3, target - 3, target)
        # Row 1: the last slice all -inf, the target elsewhere.
        logits[1, sum(widths[:last]) :] = float("-inf")
        target[1] = 0
        logits = logits.to(dtype).double()
        opts = dict(extras)
        if opts.get("token_weight"):
            opts["token_weight"] = _token_weights((N,), 12)
        w = weight if use_weight else None
        ref_in = logits.clone().requires_grad_()
        ref = fusedce.cross_entropy(ref_in, target, w, IGNORE, reduction, **opts)
        factor = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
        (ref * factor).sum().backward()

        acc = torch.float64 if dtype == torch.float64 else torch.float32
        local = logits[:, cols].to(dtype).clone().requires_grad_()
        mine = {k: (v.to(acc) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}

        def call(local=local, target=target, w=w, mine=mine, factor=factor, red=reduction, acc=acc):
            loss = vocab_parallel_cross_entropy(
                local,
                target,
                w.to(acc) if w is not None else None,
                reduction=red,
                **mine,
                process_group=dist.group.WORLD,
            )
            (loss * factor.to(acc)).sum().backward()
            return loss.detach()

        what = f"rows {dtype} {reduction} w={use_weight} {extras} widths={widths}"
        launches, loss = _launches(call)
        # The gradient launch needs a local class that no row targets (see grad_rows).
        targeted = {int(t) - start for t in target if start <= int(t) < cols.stop}
        backend = _expected_backend(dtype)
        expected = [(backend, False)] if widths[rank] and on_rows else []
        expected += [(backend, True)] if expected and widths[rank] > len(targeted) else []
        assert launches == expected, (what, launches)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        _close(loss, ref.detach(), tol, f"loss {what}")
        _close(local.grad, ref_in.grad[:, cols], GRAD_TOL[dtype], f"grad {what}")

    if min(widths) > N:
        # The linear head: one forward and one gradient-only launch per chunk of rows.
        launches, _ = _launches(
            lambda: _check_linear(
                rank, widths, torch.float32, "none", True, 0.0, True, chunk_size=3
            )
        )
        per_chunk = [(_expected_backend(torch.float32), False)] * 3
        per_chunk += [(_expected_backend(torch.float32), True)] * 3
        assert launches == (per_chunk if on_rows else []), launches

    # Every class of every slice is a target: no class is free for the rows whose class lies
    # elsewhere, so the gradient takes the torch ops; a zero class weight frees one.
    small = [2, 3] if len(widths) == 2 else [2, 1, 3]
    s0 = sum(small[:rank])
    logits = torch.randn(N, sum(small), generator=torch.Generator().manual_seed(3)).double()
    target = torch.arange(N) % sum(small)
    for zero_weight in (False, True):
        weight = torch.rand(sum(small), generator=torch.Generator().manual_seed(4)) + 0.5
        if zero_weight:
            weight[[sum(small[:r]) for r in range(len(small))]] = 0.0
        ref_in = logits.clone().requires_grad_()
        F.cross_entropy(ref_in, target, weight.double()).backward()
        local = logits[:, s0 : s0 + small[rank]].float().requires_grad_()

        def call(local=local, weight=weight):
            loss = vocab_parallel_cross_entropy(
                local, target, weight, process_group=dist.group.WORLD
            )
            loss.backward()
            return loss.detach()

        launches, loss = _launches(call)
        backend = _expected_backend(torch.float32)
        expected = [(backend, False)] + ([(backend, True)] if zero_weight else [])
        assert launches == (expected if on_rows else []), (zero_weight, launches)
        loss_ref = F.cross_entropy(logits, target, weight.double())
        _close(loss, loss_ref, 1e-5, f"every class a target, zero weight {zero_weight}")
        _close(local.grad, ref_in.grad[:, s0 : s0 + small[rank]], 1e-5, "every class: grad")


def _check_offsets(rank: int, widths: list[int]) -> None:
    """A large common offset of the logits (shift invariance): the combined loss and each
    slice's gradient within torch's own float32 error of float64 on the full row, ties at
    +-1e30 exactly (1/3 each), and the probability-target gradient too."""
    start = sum(widths[:rank])
    sl = slice(start, start + widths[rank])
    for offset, kw in ((1e8, {}), (1e30, {}), (-1e8, {"label_smoothing": 0.1}), (1e8, SCALED)):
        logits, target, _ = _data(7, (N, V), soft=False)
        full32 = (logits + offset).float()
        local = full32[:, sl].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, **kw)
        loss.backward()
        ref_in = full32.double().requires_grad_()
        ref_kw = {k: v for k, v in kw.items() if k in ("label_smoothing",)}
        if "logit_scale" in kw:  # the extras' definition, in float64
            ref_loss, ref_grad = _extras_reference(ref_in, target, kw)
        else:
            ref_loss = F.cross_entropy(ref_in, target, ignore_index=IGNORE, **ref_kw)
            (ref_grad,) = torch.autograd.grad(ref_loss, ref_in)
        t32_in = full32.clone().requires_grad_()
        if "logit_scale" in kw:
            t32_loss, t32_grad = _extras_reference(t32_in, target, kw)
        else:
            t32_loss = F.cross_entropy(t32_in, target, ignore_index=IGNORE, **ref_kw)
            (t32_grad,) = torch.autograd.grad(t32_loss, t32_in)
        torch_err = abs(float(t32_loss) - float(ref_loss))
        err = abs(float(loss) - float(ref_loss))
        assert err <= 2 * torch_err + 1e-6 * abs(float(ref_loss)) + 1e-6, (offset, err, torch_err)
        g_ref = ref_grad[:, sl]
        torch_gerr = float((t32_grad[:, sl].double() - g_ref).norm())
        gerr = float((local.grad.double() - g_ref).norm())
        assert gerr <= 2 * torch_gerr + 1e-5 * float(g_ref.norm()) + 1e-7, (offset, gerr)
    # Ties at +-1e30 across the slices: the three largest logits sit on different ranks.
    tie = torch.full((2, V), -1e30)
    tie[:, [0, V // 2, V - 1]] = 1e30
    y = torch.tensor([0, V - 1])
    local = tie[:, sl].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, y, reduction="sum")
    loss.backward()
    expected = torch.zeros(2, V)
    expected[:, [0, V // 2, V - 1]] = 1.0 / 3.0
    expected[0, 0] -= 1.0
    expected[1, V - 1] -= 1.0
    torch.testing.assert_close(local.grad, expected[:, sl], rtol=1e-6, atol=1e-7)
    assert abs(float(loss) - 2.0 * math.log(3.0)) < 1e-5


def _extras_reference(x: torch.Tensor, target: torch.Tensor, kw: dict):
    """(loss, gradient) of the extras' definition (ce_reference), in x's dtype."""
    loss, _ = extras_float64_loss(x, target, ignore_index=IGNORE, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad


def _worker(rank: int, world: int, local: str = "rows") -> None:
    # "rows": the slices' common case on the row contract (the default); "torch": torch ops.
    fusedce.sharded.slices.set_row_contract(local == "rows")
    _record_launches()
    widths = _even_widths(world)
    skewed = [1, V - 1] if world == 2 else [600, 0, V - 600]
    _check_rows(rank, widths, local == "rows")
    _check_rows(rank, skewed, local == "rows")
    _check_offsets(rank, widths)
    _check_offsets(rank, skewed)
    # Every option on float32 (class indices).
    for reduction in ("mean", "sum", "none"):
        for use_weight in (False, True):
            for eps in (0.0, 0.1):
                _check_cross_entropy(
                    rank, widths, (N, V), torch.float32, False, reduction, use_weight, eps
                )
    # Probability targets (their gradient too), ignore_index that is a real class.
    for reduction in ("mean", "none"):
        _check_cross_entropy(rank, widths, (N, V), torch.float32, True, reduction, True, 0.1)
    _check_cross_entropy(
        rank, widths, (N, V), torch.float32, False, "mean", True, 0.0, ignore_index=5
    )
    # Other dtypes.
    _check_cross_entropy(rank, widths, (N, V), torch.float64, True, "mean", True, 0.1)
    _check_cross_entropy(rank, widths, (N, V), torch.float64, False, "none", True, 0.1)
    for dtype in (torch.bfloat16, torch.float16):
        _check_cross_entropy(rank, widths, (N, V), dtype, False, "mean", True, 0.1)
        _check_cross_entropy(rank, widths, (N, V), dtype, True, "sum", False, 0.0)
    # K-dimensional (N, C, d1) and 1-D (C,) logits.
    _check_cross_entropy(rank, widths, (3, V, 4), torch.float32, False, "none", True, 0.1)
    _check_cross_entropy(rank, widths, (3, V, 4), torch.bfloat16, True, "mean", False, 0.1)
    _check_cross_entropy(rank, widths, (V,), torch.float32, False, "sum", True, 0.1)
    # The same shapes without smoothing: their slices on the row contract.
    _check_cross_entropy(rank, widths, (3, V, 4), torch.bfloat16, False, "none", True, 0.0)
    _check_cross_entropy(rank, widths, (V,), torch.float32, False, "mean", False, 0.0)
    # Very uneven slices (one of a single class, one empty), learnt or given explicitly.
    _check_cross_entropy(rank, skewed, (N, V), torch.float32, False, "mean", True, 0.1)
    _check_cross_entropy(rank, skewed, (N, V), torch.float32, True, "sum", False, 0.1)
    for eps in (0.1, 0.0):
        _check_cross_entropy(
            rank, skewed, (N, V), torch.float32, False, "none", False, eps, explicit=True
        )

    # The linear head.
    for reduction, use_weight, eps, bias in (
        ("mean", True, 0.1, True),
        ("sum", False, 0.0, False),
        ("none", True, 0.0, True),
    ):
        _check_linear(rank, widths, torch.float32, reduction, use_weight, eps, bias)
    _check_linear(rank, widths, torch.bfloat16, "mean", False, 0.1, True, lead_shape=(2, 5))
    _check_linear(rank, skewed, torch.float32, "mean", True, 0.0, False, chunk_size=None)

    # Communication: forward one all_gather (sizes) and two all_reduce; backward none for
    # the cross-entropy, one (the input gradient) for the linear head.
    logits, target, _ = _data(0, (N, V), soft=False)
    start = sum(widths[:rank])
    local = logits[:, start : start + widths[rank]].float().requires_grad_()
    fwd, bwd = _collectives(lambda: vocab_parallel_cross_entropy(local, target))
    assert fwd == {"gloo:all_gather": 1, "gloo:all_reduce": 2} and bwd == {}, (fwd, bwd)
    # Sizes given: the same exchange checks them; with the checks off they are trusted and
    # nothing is exchanged.
    fwd, bwd = _collectives(
        lambda: vocab_parallel_cross_entropy(local, target, vocab_start=start, vocab_size=V)
    )
    assert fwd == {"gloo:all_gather": 1, "gloo:all_reduce": 2} and bwd == {}, (fwd, bwd)
    fusedce.set_target_check(False)
    try:
        fwd, bwd = _collectives(
            lambda: vocab_parallel_cross_entropy(local, target, vocab_start=start, vocab_size=V)
        )
    finally:
        fusedce.set_target_check(True)
    assert fwd == {"gloo:all_reduce": 2} and bwd == {}, (fwd, bwd)
    # The extras add rows to the same two all-reduces (probability targets too).
    tw = _token_weights((N,), 0).float()
    soft = logits.softmax(1)[:, start : start + widths[rank]].float()
    for t in (target, soft):
        fwd, bwd = _collectives(
            lambda t=t: vocab_parallel_cross_entropy(
                local, t, **ALL_EXTRAS | {"token_weight": tw}, return_stats=True
            )[0]
        )
        assert fwd == {"gloo:all_gather": 1, "gloo:all_reduce": 2} and bwd == {}, (fwd, bwd)
    h = torch.randn(N, 6, requires_grad=True)
    Wl = torch.randn(widths[rank], 6, requires_grad=True)
    fwd, bwd = _collectives(lambda: vocab_parallel_linear_cross_entropy(h, Wl, target))
    assert fwd == {"gloo:all_gather": 1, "gloo:all_reduce": 2}, fwd
    assert bwd == {"gloo:all_reduce": 1}, bwd

    _check_all_extras(rank, world, widths, skewed)
    _check_dtensor(rank, world)
    _check_dtensor_extras(rank, world)
    _check_public_entry_points(rank, widths)
    _check_group_of_one(rank, world)
    _check_errors(rank, world)


def _rank_entry(rank: int, worker, world: int, init_file: str, local: str) -> None:
    """One rank's process: joins the gloo group of ``world`` ranks (file rendezvous at
    ``init_file``, one thread), runs ``worker(rank, world, local)``, meets the others at a barrier
    and leaves the group. Faulthandler is on, so that a native abort (gloo's
    threads have ended a process with SIGABRT under a heavily loaded machine, rarely) prints
    every thread's Python stack into the test's captured output instead of a bare signal."""
    faulthandler.enable(all_threads=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        worker(rank, world, local)
        # No rank tears down its gloo connections while a peer may still be finishing the
        # last collective (the ranks leave error checks at different moments).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(
    world: int, tmp_path, timeout_s: float = 150.0, local: str = "rows", worker=None
) -> None:
    """Runs ``worker(rank, world, local)`` (default ``_worker``) in a gloo group on ``world``
    processes; fails (killing them) past ``timeout_s``, so that a deadlock fails the test
    instead of hanging it."""
    ctx = mp.start_processes(
        _rank_entry,
        args=(worker or _worker, world, str(tmp_path / "pg_init"), local),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} processes did not finish within {timeout_s} s (deadlock?)")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "local",
    [
        # The slices' rows on the row contract: part of the kernel suite, so that `make test`
        # runs it through the Triton kernel (TRITON_INTERPRET=1) and the torch backend.
        pytest.param("rows", marks=pytest.mark.kernel),
        "torch",  # every slice through torch ops
    ],
)
def test_vocab_parallel_matches_unsharded(local: str, world: int, tmp_path) -> None:
    """Every option, dtype, shape and split; the linear head; DTensor input; collectives per
    call; a group of size 1; bad input on some rank raises the same error on every rank; the
    launches of the row contract for the slices' common case."""
    _spawn(world, tmp_path, local=local)


def test_without_process_group_is_the_plain_function() -> None:
    assert not dist.is_initialized()
    logits = torch.randn(5, 11)
    target = torch.tensor([0, 3, 10, IGNORE, 2])
    torch.testing.assert_close(
        vocab_parallel_cross_entropy(logits, target, label_smoothing=0.2),
        fusedce.cross_entropy(logits, target, label_smoothing=0.2),
        rtol=0,
        atol=0,
    )
    h, W = torch.randn(5, 4), torch.randn(11, 4)
    torch.testing.assert_close(
        vocab_parallel_linear_cross_entropy(h, W, target, vocab_start=0, vocab_size=11),
        fusedce.linear_cross_entropy(h, W, target),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="vocab_start=0"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=3, vocab_size=14)
    with pytest.raises(ValueError, match="both vocab_start and vocab_size"):
        vocab_parallel_cross_entropy(logits, target, vocab_size=11)
