"""``token_log_probs`` / ``linear_token_log_probs`` with ``process_group``: 2 and 3 CPU processes
over gloo.

One set of processes per world size checks every case in turn (spawning is slow). Every rank
builds the same full logits / head from one random seed, computes the float64 reference of the
UNSHARDED outputs and gradients, and compares its own slice (the input gradient of the head:
whole, it is all-reduced inside); the outputs must be bitwise the same on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_vocab_parallel import _collectives, _expect_same_error, _spawn

import fusedce
from log_prob_reference import TOL, close, reference

V = 1001  # uneven over 2 and over 3 ranks
N = 9
IGNORE = -100


def _slices(world: int, rank: int, widths: list[int]) -> slice:
    start = sum(widths[:rank])
    return slice(start, start + widths[rank])


def _same_on_every_rank(t: torch.Tensor, world: int, what: str) -> None:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), f"{what} differs across ranks"


def _data(random_seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(random_seed)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(V, (N,), generator=g)
    y[::4] = IGNORE
    y[1], y[2] = 0, V - 1  # the first and the last class: the edge slices
    g_lp = torch.randn(N, generator=g, dtype=torch.float64)
    g_h = torch.randn(N, generator=g, dtype=torch.float64)
    return logits, y, g_lp, g_h


def _check_logits(rank: int, world: int, widths: list[int], dtype: torch.dtype, T: float) -> None:
    logits, y, g_lp, g_h = _data(1, dtype)
    cols = _slices(world, rank, widths)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x64 = logits.double().clone().requires_grad_()
    ref_lp, ref_h = reference(x64, y, T, IGNORE)
    ((ref_lp * g_lp).sum() + (ref_h * g_h).sum()).backward()
    local = logits[:, cols].clone().requires_grad_()
    lp, h = fusedce.token_log_probs(
        local, y, temperature=T, return_entropy=True, process_group=dist.group.WORLD
    )
    close(lp, ref_lp.detach(), TOL[acc], f"logp {dtype} {widths}")
    close(h, ref_h.detach(), TOL[acc], f"entropy {dtype} {widths}")
    _same_on_every_rank(lp, world, "logp")
    _same_on_every_rank(h, world, "entropy")
    ((lp * g_lp.to(acc)).sum() + (h * g_h.to(acc)).sum()).backward()
    close(local.grad, x64.grad[:, cols], TOL[dtype], f"grad slice {dtype} {widths}")
    # logp alone.
    local.grad = None
    x64.grad = None
    lp = fusedce.token_log_probs(local, y, temperature=T, process_group=dist.group.WORLD)
    (lp * g_lp.to(acc)).sum().backward()
    ref_lp, _ = reference(x64, y, T, IGNORE)
    (ref_lp * g_lp).sum().backward()
    close(local.grad, x64.grad[:, cols], TOL[dtype], f"grad slice, logp alone {widths}")


def _check_linear(rank: int, world: int, widths: list[int], dtype: torch.dtype, bias: bool):
    g = torch.Generator().manual_seed(2)
    D, T = 6, 1.3
    x = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    _, y, g_lp, g_h = _data(3, torch.float64)
    y = torch.stack([y, y.flip(0)])
    g_lp, g_h = torch.stack([g_lp, g_h]), torch.stack([g_h, g_lp])
    cols = _slices(world, rank, widths)
    xs = x.to(dtype).requires_grad_()
    Ws = W[cols].to(dtype).requires_grad_()
    bs = b[cols].to(dtype).requires_grad_() if bias else None
    lp, h = fusedce.linear_token_log_probs(
        xs, Ws, y, linear_bias=bs, temperature=T, process_group=dist.group.WORLD, chunk_size=4
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    refs = [t.to(dtype).double().requires_grad_() for t in (x, W, b)]
    logits = refs[0] @ refs[1].t() + (refs[2] if bias else 0.0)
    ref_lp, ref_h = reference(logits, y, T, IGNORE)
    tol = TOL[dtype] if dtype != torch.float64 else 1e-9
    close(lp, ref_lp.detach(), max(tol, TOL[acc]), f"linear logp {widths}")
    close(h, ref_h.detach(), max(tol, TOL[acc]), f"linear entropy {widths}")
    _same_on_every_rank(lp, world, "linear logp")
    ((lp * g_lp.to(acc)).sum() + (h * g_h.to(acc)).sum()).backward()
    ((ref_lp * g_lp).sum() + (ref_h * g_h).sum()).backward()
    close(xs.grad, refs[0].grad, 2 * tol, f"linear grad_input {widths}")
    close(Ws.grad, refs[1].grad[cols], 2 * tol, f"linear grad_weight {widths}")
    if bias:
        close(bs.grad, refs[2].grad[cols], 2 * tol, f"linear grad_bias {widths}")
    _same_on_every_rank(xs.grad, world, "input gradient")


def _check_dtensor(rank: int, world: int) -> None:
    """A DTensor logits sharded on the class dimension (and a DTensor head weight sharded by
    rows): replicated DTensor outputs, the unsharded values and gradients."""
    # Optional: torch.distributed.tensor exists only in torch builds with distributed.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    logits, y, g_lp, g_h = _data(1, torch.float32)
    x64 = logits.double().requires_grad_()
    ref_lp, ref_h = reference(x64, y, 0.8, IGNORE)
    ((ref_lp * g_lp).sum() + (ref_h * g_h).sum()).backward()
    dt = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
    lp, h = fusedce.token_log_probs(dt, y, temperature=0.8, return_entropy=True)
    for out, ref, what in ((lp, ref_lp, "logp"), (h, ref_h, "entropy")):
        assert isinstance(out, DTensor) and out.placements == (Replicate(),), what
        close(out.to_local(), ref.detach(), TOL[torch.float32], f"DTensor {what}")
    ((lp.to_local() * g_lp.float()).sum() + (h.to_local() * g_h.float()).sum()).backward()
    assert isinstance(dt.grad, DTensor) and dt.grad.placements == dt.placements
    close(dt.grad.full_tensor(), x64.grad, TOL[torch.float32], "DTensor grad")
    # Sharded on another dimension: the same error on every rank, before any collective.
    rows = distribute_tensor(logits, mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"^token_log_probs: .*Shard\(-1\)"):
        fusedce.token_log_probs(rows, y)
    # The head with a DTensor weight sharded by rows.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, 5, generator=g, requires_grad=True)
    W = torch.randn(V, 5, generator=g)
    ref_lp, ref_h = fusedce.linear_token_log_probs(x, W, y)
    (ref_lp.sum() + ref_h.sum()).backward()
    ref_gx, x.grad = x.grad, None
    lp, h = fusedce.linear_token_log_probs(x, distribute_tensor(W, mesh, [Shard(0)]), y)
    assert isinstance(lp, DTensor) and isinstance(h, DTensor)
    close(lp.to_local(), ref_lp.detach().double(), TOL[torch.float32], "DTensor head logp")
    close(h.to_local(), ref_h.detach().double(), TOL[torch.float32], "DTensor head entropy")
    (lp.to_local().sum() + h.to_local().sum()).backward()
    close(x.grad, ref_gx.double(), TOL[torch.float32], "DTensor head grad_input")


def _worker(rank: int, world: int, _unused: str = "") -> None:
    even = [len(c) for c in torch.arange(V).chunk(world)]
    # One slice of a single class and, on 3 ranks, an empty one.
    skewed = [1, V - 1] if world == 2 else [600, 0, V - 600]
    for widths in (even, skewed):
        _check_logits(rank, world, widths, torch.float32, 0.8)
        _check_linear(rank, world, widths, torch.float32, bias=True)
    for dtype in (torch.bfloat16, torch.float64):
        _check_logits(rank, world, even, dtype, 1.0)
        _check_linear(rank, world, even, dtype, bias=dtype == torch.float64)
    _check_dtensor(rank, world)

    # Forward: the metadata agreement and one gather of 5 numbers per row; backward: none
    # for the logits, the input gradient's all-reduce for the head.
    logits, y, _, _ = _data(1, torch.float32)
    local = logits[:, _slices(world, rank, even)].clone().requires_grad_()
    fwd, bwd = _collectives(
        lambda: sum(
            fusedce.token_log_probs(local, y, return_entropy=True, process_group=dist.group.WORLD)
        ).sum()
    )
    assert fwd == {"gloo:all_gather": 2} and bwd == {}, (fwd, bwd)
    h = torch.randn(N, 4, requires_grad=True)
    Wl = torch.randn(even[rank], 4, requires_grad=True)
    fwd, bwd = _collectives(
        lambda: fusedce.linear_token_log_probs(h, Wl, y, process_group=dist.group.WORLD)[0].sum()
    )
    assert fwd == {"gloo:all_gather": 2} and bwd == {"gloo:all_reduce": 1}, (fwd, bwd)

    # Bad input on one rank: the same error on every rank, nobody left waiting.
    bad_y = y.clone()
    bad_y[0] = V  # out of range: every rank sees the same global id
    _expect_same_error(
        rank,
        world,
        IndexError,
        "out of bounds",
        lambda: fusedce.token_log_probs(local, bad_y, process_group=dist.group.WORLD),
    )
    T = 0.5 if rank == 0 else 1.0
    _expect_same_error(
        rank,
        world,
        ValueError,
        "disagree",
        lambda: fusedce.token_log_probs(local, y, temperature=T, process_group=dist.group.WORLD),
    )
    T = -1.0 if rank == world - 1 else 1.0
    _expect_same_error(
        rank,
        world,
        ValueError,
        "temperature",
        lambda: fusedce.linear_token_log_probs(
            h, Wl, y, temperature=T, process_group=dist.group.WORLD
        ),
    )
    # A group of one rank is the plain function (every rank creates every group).
    solo = [dist.new_group([r]) for r in range(world)][rank]
    x = torch.randn(3, 7)
    t = torch.tensor([1, IGNORE, 6])
    assert torch.equal(
        fusedce.token_log_probs(x, t, process_group=solo), fusedce.token_log_probs(x, t)
    )


@pytest.mark.kernel
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_log_probs_match_unsharded(world: int, tmp_path) -> None:
    """Values, entropies and gradients of every slice (even and skewed splits, an empty slice),
    bitwise equal on every rank; DTensor logits and head weights; the collectives per call;
    errors raised on every rank."""
    _spawn(world, tmp_path, worker=_worker)
