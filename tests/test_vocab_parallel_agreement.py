"""What the ranks of the vocabulary-parallel loss agree on, over 2 CPU processes (gloo).

One spawn checks, each case raising the same exception on every rank (nobody left waiting):
class weights that differ across ranks (their values, not only their count), ``vocab_start`` /
``vocab_size`` that do not match the slice sizes (now checked in the same exchange, so a
rank-specific error with the sizes given raises everywhere too), a rank outside the group and
a DeviceMesh passed as ``process_group``, and the name sweep of ``test_error_names.py`` through
the sharded path and through groups of one rank. The harness is ``test_vocab_parallel.py``'s.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_vocab_parallel import IGNORE, N, V, _close, _data, _even_widths, _spawn

import fusedce
from fusedce.sharded import agreement
from fusedce.vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

D = 6


def _same_error(rank: int, world: int, exc: type[Exception], name: str, fragment: str, fn):
    """``fn`` raises ``exc`` on EVERY rank with the same message, which starts with ``name``
    (the function called) and holds ``fragment``."""
    try:
        fn()
    except exc as e:
        message = str(e)
    else:
        raise AssertionError(f"rank {rank}: expected {exc.__name__} ({fragment})")
    assert message.startswith(f"{name}: "), message
    assert fragment in message, message
    messages: list[object] = [None] * world
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, messages
    return message


class _Setup:
    """One rank's share of the same full problem: logits and head rows of its slice."""

    def __init__(self, rank: int, world: int, seed: int = 11) -> None:
        logits, self.target, weight = _data(seed, (N, V), soft=False)
        self.widths = _even_widths(world)
        self.start = sum(self.widths[:rank])
        cols = slice(self.start, self.start + self.widths[rank])
        self.full = logits.float()
        self.x = self.full[:, cols]
        self.w = weight.float()
        g = torch.Generator().manual_seed(seed)
        self.h = torch.randn(N, D, generator=g)
        self.head = torch.randn(V, D, generator=g)
        self.W = self.head[cols]

    def calls(self, group: object) -> dict[str, object]:
        """name -> f(**kwargs) for the four entry points that take a process group."""
        x, h, W, t = self.x, self.h, self.W, self.target
        return {
            "vocab_parallel_cross_entropy": lambda **kw: vocab_parallel_cross_entropy(
                x, t, process_group=group, **kw
            ),
            "cross_entropy": lambda **kw: fusedce.cross_entropy(x, t, process_group=group, **kw),
            "vocab_parallel_linear_cross_entropy": lambda **kw: vocab_parallel_linear_cross_entropy(
                h, W, t, process_group=group, **kw
            ),
            "linear_cross_entropy": lambda **kw: fusedce.linear_cross_entropy(
                h, W, t, process_group=group, **kw
            ),
        }


def _check_class_weights(rank: int, world: int) -> None:
    s = _Setup(rank, world)
    other = s.w.clone()
    if rank == 1:
        other[7] *= 2.0  # one value differs on one rank
    flipped = s.w if rank == 0 else s.w.flip(0)  # the same values, another order
    for name, call in s.calls(dist.group.WORLD).items():
        _same_error(
            rank,
            world,
            ValueError,
            name,
            "weight differs across ranks",
            partial(call, weight=other),
        )
        _same_error(rank, world, ValueError, name, "weight differs", partial(call, weight=flipped))
    # With the sizes given the same exchange checks them.
    _same_error(
        rank,
        world,
        ValueError,
        "vocab_parallel_cross_entropy",
        "weight differs",
        lambda: vocab_parallel_cross_entropy(
            s.x, s.target, other, vocab_start=s.start, vocab_size=V
        ),
    )
    # The same values in another dtype agree, and give the unsharded loss on every rank.
    mixed = s.w if rank == 0 else s.w.double()
    loss = vocab_parallel_cross_entropy(s.x, s.target, mixed)
    _close(loss, F.cross_entropy(s.full.double(), s.target, s.w.double()), 1e-5, "mixed dtype")
    losses: list[object] = [None] * world
    dist.all_gather_object(losses, loss)
    assert all(torch.equal(each, loss) for each in losses), losses


def _check_declared_sizes(rank: int, world: int) -> None:
    s = _Setup(rank, world, seed=12)
    ref = F.cross_entropy(s.full.double(), s.target)
    vpce, vplce = vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    name, lname = "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"
    wrong = s.start if rank == 0 else s.start - 101  # fits in V, but overlaps rank 0's slice
    expected = s.widths[0]
    fragment = f"vocab_start={expected - 101} on rank 1 of {world} does not match the slice sizes"
    message = _same_error(
        rank,
        world,
        ValueError,
        name,
        fragment,
        lambda: vpce(s.x, s.target, vocab_start=wrong, vocab_size=V),
    )
    assert f"the slice of rank 1 starts at {expected}" in message, message
    _same_error(
        rank,
        world,
        ValueError,
        lname,
        fragment,
        lambda: vplce(s.h, s.W, s.target, vocab_start=wrong, vocab_size=V),
    )
    # Every rank says it starts at 0.
    _same_error(
        rank,
        world,
        ValueError,
        name,
        "vocab_start=0 on rank 1",
        lambda: vpce(s.x, s.target, vocab_start=0, vocab_size=V),
    )
    # A vocab_size the slices do not cover (a gap at the end).
    _same_error(
        rank,
        world,
        ValueError,
        name,
        f"vocab_size={V + 7} on rank 0 of {world}, but the slices hold {V} classes",
        lambda: vpce(s.x, s.target, vocab_start=s.start, vocab_size=V + 7),
    )
    # A bad argument on one rank, with the sizes given: every rank raises (no rank waits).
    start = "0" if rank == 1 else s.start
    _same_error(
        rank,
        world,
        TypeError,
        name,
        f"rank 1 of {world} rejected its arguments",
        lambda: vpce(s.x, s.target, vocab_start=start, vocab_size=V),
    )
    # The sizes on one rank only: checked, and the loss of the whole vocabulary.
    sizes = {"vocab_start": s.start, "vocab_size": V} if rank == 0 else {}
    _close(vpce(s.x, s.target, **sizes), ref, 1e-5, "sizes on one rank")
    # The checks off: the sizes are trusted (no exchange); right ones give the right loss.
    fusedce.set_target_check(False)
    try:
        loss = vpce(s.x, s.target, vocab_start=s.start, vocab_size=V)
    finally:
        fusedce.set_target_check(True)
    _close(loss, ref, 1e-5, "sizes trusted")


def _check_groups(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    s = _Setup(rank, world)
    s.target = torch.where(s.target == IGNORE, IGNORE, s.target % s.widths[rank])  # local classes
    outside = dist.new_group([0])  # every rank creates it; rank 1 is not in it
    mesh = init_device_mesh("cpu", (world,))
    for name, call in s.calls(outside).items():
        if rank == 0:  # a group of one rank: the plain function of the local slice
            call()
        else:
            with pytest.raises(ValueError, match=rf"^{name}: this rank is not a member"):
                call()
    for name, call in s.calls(mesh).items():
        with pytest.raises(TypeError, match=rf"^{name}: process_group must be.*mesh.get_group"):
            call()


# What each bad argument raises: (exception, a fragment of the message).
BAD_KINDS = {
    "class index": (IndexError, "is out of bounds"),
    "weight shape": (ValueError, "weight must be a 1-D tensor"),
    "target dtype": (TypeError, "class-index targets must be int64, int32 or uint8"),
    "input dtype": (TypeError, "must be a floating tensor"),
}


def _spoil(s: _Setup, kind: str, vocab: int) -> _Setup:
    if kind == "class index":
        s.target = s.target.clone()
        s.target[2] = vocab
    elif kind == "target dtype":
        s.target = s.target.to(torch.int16)
    elif kind == "input dtype":
        s.x, s.h = s.x.long(), s.h.long()
    return s


def _check_names(rank: int, world: int) -> None:
    """The sweep of bad arguments through the sharded path (every rank raises) and through a
    group of one rank (the plain function): each message names the function called."""
    ones = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    for group, sharded in ((dist.group.WORLD, True), (ones[rank], False)):
        for kind, (exc, fragment) in BAD_KINDS.items():
            s = _Setup(rank, world)
            vocab = V if sharded else s.widths[rank]
            if not sharded:  # this rank's slice is the whole vocabulary
                s.target = torch.where(s.target == IGNORE, IGNORE, s.target % vocab)
            s = _spoil(s, kind, vocab)
            if kind == "class index":
                fragment = f"target class index {vocab} is out of bounds for {vocab} classes"
            kwargs = {"weight": torch.ones(vocab + 1)} if kind == "weight shape" else {}
            for name, call in s.calls(group).items():
                if sharded:
                    _same_error(rank, world, exc, name, fragment, partial(call, **kwargs))
                else:
                    with pytest.raises(exc) as info:
                        call(**kwargs)
                    message = str(info.value)
                    assert message.startswith(f"{name}: ") and fragment in message, message


def _agreement_worker(rank: int, world: int, _local: str) -> None:
    _check_class_weights(rank, world)
    _check_declared_sizes(rank, world)
    _check_groups(rank, world)
    _check_names(rank, world)
    # The group is still in step: a good call after all those errors.
    s = _Setup(rank, world)
    loss = vocab_parallel_cross_entropy(s.x, s.target, s.w)
    _close(loss, F.cross_entropy(s.full.double(), s.target, s.w.double()), 1e-5, "after")


def test_ranks_agree_on_weights_sizes_and_groups(tmp_path) -> None:
    _spawn(2, tmp_path, timeout_s=120.0, worker=_agreement_worker)


def test_metadata_columns() -> None:
    """The exchange's row: one named column per field, in the fields' order; the documented
    size (the benchmark's byte formula reads it)."""
    from benchmarks.bench_vocab_parallel import META_INT64

    cols = list(agreement._Col)
    assert [c.name for c in cols] == [f.name for f in agreement._FIELDS]
    assert [int(c) for c in cols] == list(range(len(cols)))
    assert len(cols) == META_INT64
    assert all(not agreement._FIELDS[c].agree for c in (cols[0], cols[1]))
