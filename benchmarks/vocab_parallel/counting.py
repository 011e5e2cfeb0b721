"""Counting what each rank hands to ``torch.distributed``: the shim around the collectives
(`CollectiveCounter`), the profiler's record of the process group's calls (`profiler_numels`)
and the documented formulas the counts are checked against."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# torch.distributed entry points the shim wraps: every collective and point-to-point call.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)
META_INT64 = 24  # the int64 row per rank of the sizes' all_gather (docs/VOCAB_PARALLEL.md)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CollectiveCounter:
    """Records every ``torch.distributed`` collective called while :meth:`active` is on: the op,
    the phase (set by the caller: "fwd" / "bwd"), the tensor a rank hands in (dtype, shape,
    bytes) and the ring algorithm's bytes on the wire per rank. Nested calls (``all_gather_object``
    calling ``all_gather``) count once, as the outer call."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.records: list[dict[str, Any]] = []
        self.phase = "fwd"
        self._depth = threading.local()

    def _record(self, op: str, args: tuple, kwargs: dict) -> None:
        w = self.world
        # What this rank contributes: the in-place buffer (all_reduce, broadcast) or the input
        # (all_gather*: the 2nd argument; reduce_scatter*: the input list / tensor).
        if op in ("all_gather", "all_gather_into_tensor"):
            inp = _tensors(
                args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor"))
            )
        elif op in ("reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single"):
            inp = _tensors(
                args[1] if len(args) > 1 else kwargs.get("input_list", kwargs.get("input"))
            )
        else:
            inp = _tensors(args[:1] or list(kwargs.values()))
        nbytes = sum(_nbytes(t) for t in inp)
        ring_factor = {"all_reduce": 2 * (w - 1) / w, "all_gather": w - 1}
        factor = ring_factor.get(op.replace("_into_tensor", ""))
        ring = None if factor is None else factor * nbytes
        self.records.append(
            {
                "op": op,
                "phase": self.phase,
                "dtype": str(inp[0].dtype).replace("torch.", "") if inp else None,
                "shape": [list(t.shape) for t in inp],
                "numel": sum(t.numel() for t in inp),
                "bytes": nbytes,
                "ring_bytes": ring,
            }
        )

    def _wrap(self, op: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                self._record(op, args, kwargs)
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return wrapper

    @contextlib.contextmanager
    def active(self) -> Iterator[CollectiveCounter]:
        """Wraps the collectives of ``torch.distributed`` (and of ``distributed_c10d``, where
        they are defined) for the duration of the block."""
        saved: list[tuple[Any, str, Any]] = []
        try:
            for op in COLLECTIVES:
                original = getattr(c10d, op, None)
                if original is None:
                    continue
                wrapped = self._wrap(op, original)
                for module in (dist, c10d):
                    if getattr(module, op, None) is original:
                        saved.append((module, op, original))
                        setattr(module, op, wrapped)
            yield self
        finally:
            for module, op, original in saved:
                setattr(module, op, original)


def profiler_numels(prof: Any) -> list[tuple[str, int]]:
    """(op, elements of its input) of every process-group call in a ``torch.profiler`` record
    (``gloo:all_reduce``, ``nccl:all_gather``, ...)."""
    out = []
    for e in prof.events():
        name = e.name
        if name.startswith(("gloo:", "nccl:")):
            shapes = [s for s in (e.input_shapes or []) if s]
            numel = 0
            if shapes:
                numel = 1
                for d in shapes[0]:
                    numel *= d
            out.append((name.split(":", 1)[1], numel))
    return out


@contextlib.contextmanager
def profiler_log_filtered() -> Iterator[None]:
    """Keeps the profiler's start / stop log lines (written by its C++ side to file descriptor 2,
    a few per call and rank) out of the output; anything else written there is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [
                line
                for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                if "ActivityProfilerHandler" not in line
            ]
            if kept:
                sys.stderr.write("".join(kept))


def sharded_formula_bytes(n: int, world: int, sizes_learnt: bool, dtype: torch.dtype) -> int:
    """Bytes each rank hands to the collectives in one call of the sharded loss, as documented:
    the sizes' all_gather of 24 int64 (unless given), the (N,) row maxima and the (2, N) sums in
    the accumulation dtype (float32; float64 for float64 logits); nothing in backward."""
    acc = 8 if dtype == torch.float64 else 4
    return (META_INT64 * 8 if sizes_learnt else 0) + 3 * n * acc


def gather_formula_bytes(n: int, widths: list[int], dtype: torch.dtype) -> int:
    """Bytes each rank hands to the all_gather of the gather path: its (N, max V_r) slice."""
    return n * max(widths) * torch.empty((), dtype=dtype).element_size()
