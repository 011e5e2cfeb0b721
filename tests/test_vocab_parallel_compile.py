"""``torch.compile`` of a function that calls the sharded loss (2 gloo processes).

The sharded call is ``torch.compiler.disable``-d (at its first call, so that ``import fusedce``
does not import dynamo; the first call here is under compile): dynamo breaks the graph around
it and runs it eagerly (its metadata exchange reads numbers back to the host, and its autograd
Function holds the collectives), so ``fullgraph=True`` is refused by dynamo while the default
mode compiles the code around the call and gives the eager result.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_vocab_parallel import _spawn

import fusedce

N, V = 6, 301


def _worker(rank: int, world: int, _local: str = "") -> None:
    """One rank's checks (run by ``test_vocab_parallel._spawn`` in a gloo group)."""
    pg = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    full = torch.randn(N, V, generator=g)
    target = torch.randint(V, (N,), generator=g)
    cols = torch.arange(V).chunk(world)[rank]
    local = full[:, cols].contiguous()

    def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        loss, stats = fusedce.cross_entropy(
            x * 2.0, t, softcap=5.0, z_loss=1e-3, return_stats=True, process_group=pg
        )
        return loss + 0.0 * stats.entropy.sum()

    # The plain call with the default (inductor) backend, first: the sharded call applies
    # torch.compiler.disable at its first call, which here happens while dynamo traces.
    def plain(x: torch.Tensor) -> torch.Tensor:
        return fusedce.cross_entropy(x, target, process_group=pg)

    first = torch.compile(plain)(local)
    torch.testing.assert_close(first, plain(local), rtol=1e-6, atol=1e-6)

    a = local.clone().requires_grad_()
    b = local.clone().requires_grad_()
    eager = step(a, target)
    eager.backward()
    compiled = torch.compile(step, backend="aot_eager")(b, target)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6)
    ref = fusedce.cross_entropy(full.double() * 2.0, target, softcap=5.0, z_loss=1e-3)
    torch.testing.assert_close(compiled.double(), ref, rtol=1e-5, atol=1e-6)

    # fullgraph=True cannot hold the sharded call: dynamo refuses it, on every rank alike.
    def whole(x: torch.Tensor) -> torch.Tensor:
        return fusedce.cross_entropy(x, target, process_group=pg)

    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(whole, fullgraph=True)(local)


def test_compiled_sharded_call_matches_eager(tmp_path) -> None:
    _spawn(2, tmp_path, timeout_s=300.0, worker=_worker)
