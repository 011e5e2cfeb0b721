"""Vocabulary-parallel benchmark: bytes sent and time of the sharded loss against gathering the
logits.

Run as ``python -m benchmarks.bench_vocab_parallel`` (``--help`` for the options). The script
spawns ``--world`` processes itself (``torch.multiprocessing``; gloo on the CPU, NCCL with one GPU
per rank). Rank r holds the (N, V_r) logits of the classes [start_r, start_r + V_r) (V split as
evenly as it goes; the first ranks get one class more) and the global class indices (N,). Per
cell (N, V), forward + backward (``loss.backward()``: the gradient of the local slice) of:

* ``sharded``: ``fusedce.cross_entropy(local, target, process_group=pg)`` (the slice sizes learnt
  by the call's small all_gather, the default);
* ``sharded_sizes``: ``vocab_parallel_cross_entropy(local, target, process_group=pg,
  vocab_start=..., vocab_size=V)`` with ``set_target_check(False)`` (the sizes trusted: no
  all_gather);
* ``gather``: ``dist.all_gather`` of every rank's slice (padded to the widest slice, as a
  collective of equal-sized buffers needs), the (N, V) logits rebuilt with this rank's own slice
  in place (so that backward routes the gradient to it), then the plain
  ``fusedce.cross_entropy`` on the full logits on every rank.

Bytes are counted, not estimated: one call of each path (forward, then backward) runs with every
``torch.distributed`` collective wrapped by a counting shim (what each rank hands to the
collective: the all_reduce buffer, its own all_gather input), and under ``torch.profiler``, whose
record of the process group's own calls (``gloo:*`` / ``nccl:*`` with their input shapes) is
compared element for element with the shim. The sharded counts are checked against the formula of
docs/VOCAB_PARALLEL.md: 24 int64 (sizes learnt) + (N,) + (2, N) float32 = 192 + 12 N bytes per
rank per call, none in backward. Also reported: the bytes a ring algorithm puts on the wire per
rank (all_reduce 2 (W - 1) / W B, all_gather (W - 1) B).

Time: the paths run interleaved (round-robin, so that a shared machine's load hits them alike),
each call after a ``dist.barrier()``; rank 0's median wall time of forward + backward
(synchronised on CUDA). Checks: the loss of the three paths and the gradient of the slices agree.

Outputs in ``--out`` (default a fresh ``runs/benchmarks/<date>-<time>/``; the committed results
in ``benchmarks/results`` are replaced only with ``--overwrite``): ``<stem>.md``, ``.json`` (card,
versions, date, commit, every sample) and ``.png`` (bytes per rank against V, both paths);
default stem ``<card>-vocab-parallel-<date>``. With CUDA picked but fewer GPUs than ranks the
script prints that the GPU rows need that many GPUs and exits 0 without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import base_environment, csv, fmt, pick_device, pyplot, slug, write_json

# The committed results: a run replaces files there only with --overwrite.
COMMITTED = Path(__file__).resolve().parent / "results"
PATHS = ("sharded", "sharded_sizes", "gather")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
# Grids (N values, V values): the CPU one fits a few minutes on 2 shared cores.
GRID_CPU = ((256, 1024), (8192, 32000, 128256))
GRID_GPU = ((2048, 8192), (32000, 128256, 256000))
GRID_QUICK = ((64,), (1000, 4000))
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


# --------------------------------------------------------------------------------------------
# Counting the collectives
# --------------------------------------------------------------------------------------------


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
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

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
def _profiler_log_filtered() -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# The worker (one per rank)
# --------------------------------------------------------------------------------------------


def split_widths(vocab: int, world: int) -> list[int]:
    """V split over the ranks as evenly as it goes (the first ranks get one class more)."""
    base, extra = divmod(vocab, world)
    return [base + (r < extra) for r in range(world)]


def _path_functions(
    rank: int, world: int, vocab: int, local: torch.Tensor, target: torch.Tensor, pg: Any
) -> dict[str, Callable[[], torch.Tensor]]:
    """The three ways to the loss from this rank's (N, V_r) slice ``local``."""
    import torch.distributed as dist

    import fusedce
    from fusedce.index_check import target_check_enabled
    from fusedce.vocab_parallel import vocab_parallel_cross_entropy

    widths = split_widths(vocab, world)
    start, width, wmax = sum(widths[:rank]), widths[rank], max(widths)

    def sharded() -> torch.Tensor:
        return fusedce.cross_entropy(local, target, process_group=pg)

    def sharded_sizes() -> torch.Tensor:
        # The sizes given and the checks off: trusted, no exchange (with the checks on, the same
        # all_gather as the sharded path checks them).
        checking = target_check_enabled()
        fusedce.set_target_check(False)
        try:
            return vocab_parallel_cross_entropy(
                local, target, process_group=pg, vocab_start=start, vocab_size=vocab
            )
        finally:
            fusedce.set_target_check(checking)

    def gather() -> torch.Tensor:
        send = local.detach()
        if width < wmax:  # equal-sized buffers for the collective
            send = torch.nn.functional.pad(send, (0, wmax - width))
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send.contiguous(), group=pg)
        parts = [p[:, : widths[r]] for r, p in enumerate(parts)]
        parts[rank] = local  # this rank's own slice: backward gives its gradient
        return fusedce.cross_entropy(torch.cat(parts, dim=1), target)

    return {"sharded": sharded, "sharded_sizes": sharded_sizes, "gather": gather}


def _run_cell(
    rank: int, world: int, cfg: dict[str, Any], n: int, vocab: int, pg: Any, device: torch.device
) -> dict[str, Any]:
    """One (N, V) on this rank: a counted call per path, then the interleaved timed calls."""
    import torch.distributed as dist

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    widths = split_widths(vocab, world)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    local = torch.randn(n, widths[rank], generator=gen) * 3
    local = local.to(device=device, dtype=DTYPES[cfg["dtype"]]).requires_grad_()
    tgen = torch.Generator().manual_seed(cfg["seed"])  # the same target on every rank
    target = torch.randint(0, vocab, (n,), generator=tgen).to(device)
    every = _path_functions(rank, world, vocab, local, target, pg)
    fns = {k: every[k] for k in cfg["paths"]}
    cell: dict[str, Any] = {"n": n, "v": vocab, "widths": widths, "paths": {}}

    # One counted call per path (also the warm-up): the shim and the profiler.
    grads = {}
    for name, fn in fns.items():
        counter = CollectiveCounter(world)
        local.grad = None
        dist.barrier()
        with (
            _profiler_log_filtered(),
            torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
            ) as prof,
            counter.active(),
        ):
            counter.phase = "fwd"
            loss = fn()
            counter.phase = "bwd"
            loss.backward()
            sync()
        grads[name] = local.grad.float()
        cell["paths"][name] = {
            "collectives": counter.records,
            "profiler": profiler_numels(prof),
            "loss": float(loss.detach()),
        }
    ref = grads[next(iter(fns))]
    for name, grad in grads.items():
        cell["paths"][name]["grad_max_abs_diff"] = float((grad - ref).abs().max())

    # Timed calls, interleaved, each after a barrier.
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(cfg["warmup"] + cfg["repeats"]):
        for name, fn in fns.items():
            local.grad = None
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            fn().backward()
            sync()
            if rep >= cfg["warmup"]:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    for name in fns:
        cell["paths"][name]["ms_samples"] = samples[name]
    if rank == 0:
        medians = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in samples.items() if v)
        print(f"  W={world} N={n} V={vocab}: ms {medians}", flush=True)
    return cell


def _worker(rank: int, world: int, cfg: dict[str, Any], init_file: str, out_dir: str) -> None:
    """One rank: every cell of the grid; writes ``rank<r>.json`` into ``out_dir``."""
    import torch.distributed as dist

    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    result: dict[str, Any] = {"rank": rank, "cells": [], "error": None}
    kwargs: dict[str, Any] = {}
    if cuda:
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    elif cfg["cpu_threads"] > 0:
        torch.set_num_threads(cfg["cpu_threads"])
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=_dt.timedelta(seconds=cfg["pg_timeout_s"]),
        **kwargs,
    )
    try:
        for n, vocab in cfg["cells"]:
            result["cells"].append(_run_cell(rank, world, cfg, n, vocab, dist.group.WORLD, device))
            if cuda:
                torch.cuda.empty_cache()
    except Exception:
        result["error"] = traceback.format_exc()
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def run_world(world: int, cfg: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Spawns ``world`` ranks over the grid; returns each rank's record (rank order). Raises
    RuntimeError naming the failure when a rank fails or the group outlives ``timeout_s``."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="fusedce_vp_") as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(world, cfg, str(Path(tmp, "pg_init")), tmp),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{world} ranks did not finish within {timeout_s:.0f} s")
        except Exception as exc:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"the benchmark with {world} ranks failed: {exc}") from exc
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


# --------------------------------------------------------------------------------------------
# Summaries and outputs
# --------------------------------------------------------------------------------------------


def summarise_cell(world: int, dtype: torch.dtype, ranks: list[dict[str, Any]], i: int) -> dict:
    """One (W, N, V) row: bytes per rank and call (checked against the formula and the
    profiler), rank 0's median time, the ratios gather / sharded and the agreement checks."""
    cells = [r["cells"][i] for r in ranks]
    c0 = cells[0]
    n, widths = c0["n"], c0["widths"]
    row: dict[str, Any] = {"world": world, "n": n, "v": c0["v"], "widths": widths, "paths": {}}
    for name, rec0 in c0["paths"].items():
        per_rank = []
        for c in cells:
            rec = c["paths"][name]
            shim = [(r["op"].replace("_into_tensor", ""), r["numel"]) for r in rec["collectives"]]
            per_rank.append(
                {
                    "bytes": sum(r["bytes"] for r in rec["collectives"]),
                    "bytes_fwd": sum(r["bytes"] for r in rec["collectives"] if r["phase"] == "fwd"),
                    "bytes_bwd": sum(r["bytes"] for r in rec["collectives"] if r["phase"] == "bwd"),
                    "ring_bytes": sum(r["ring_bytes"] or 0 for r in rec["collectives"]),
                    "profiler_agrees": [tuple(p) for p in rec["profiler"]] == shim
                    if rec["profiler"]
                    else None,
                }
            )
        if name == "gather":
            formula = gather_formula_bytes(n, widths, dtype)
        else:
            formula = sharded_formula_bytes(n, world, name == "sharded", dtype)
        ms = rec0["ms_samples"]
        row["paths"][name] = {
            "bytes_per_rank": [p["bytes"] for p in per_rank],
            "bytes": per_rank[0]["bytes"],
            "bytes_fwd": per_rank[0]["bytes_fwd"],
            "bytes_bwd": per_rank[0]["bytes_bwd"],
            "ring_bytes": per_rank[0]["ring_bytes"],
            "formula_bytes": formula,
            "formula_ok": all(p["bytes"] == formula for p in per_rank),
            "profiler_agrees": all(p["profiler_agrees"] for p in per_rank)
            if all(p["profiler_agrees"] is not None for p in per_rank)
            else None,
            "collectives_rank0": [
                {k: r[k] for k in ("op", "phase", "dtype", "shape", "bytes")}
                for r in rec0["collectives"]
            ],
            "ms_median": statistics.median(ms) if ms else None,
            "ms_median_per_rank": [
                statistics.median(c["paths"][name]["ms_samples"])
                if c["paths"][name]["ms_samples"]
                else None
                for c in cells
            ],
            "ms_samples_rank0": ms,
            "loss": rec0["loss"],
            "loss_per_rank": [c["paths"][name]["loss"] for c in cells],
            "grad_max_abs_diff": max(c["paths"][name]["grad_max_abs_diff"] for c in cells),
        }
    p = row["paths"]
    if "gather" in p and "sharded" in p:
        s, g = p["sharded"], p["gather"]
        row["bytes_ratio"] = g["bytes"] / s["bytes"] if s["bytes"] else None
        row["time_ratio"] = (
            g["ms_median"] / s["ms_median"] if g["ms_median"] and s["ms_median"] else None
        )
    losses = [x for rec in p.values() for x in rec["loss_per_rank"]]
    row["loss_spread"] = max(losses) - min(losses)
    return row


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: set-up, the bytes and time table, the collectives of one cell."""
    env = report["environment"]
    lines = [
        f"# Vocabulary-parallel cross-entropy: {env['card']}, {env['date'][:10]}",
        "",
        f"{env['backend']} over {', '.join(str(w) for w in env['worlds'])} processes "
        f"({env['rank_device']}); logits {env['dtype']}, `randn * 3`, uniform class indices, "
        f"mean reduction; forward + backward per call. torch {env['torch']}, python "
        f"{env['python']}, commit {env['git_commit']}, host {env['host']}"
        + (f", load average at the end {env['load_average'][0]}" if env.get("load_average") else "")
        + ".",
        "",
        "Paths: `sharded` = `fusedce.cross_entropy(local, target, process_group=pg)` (slice "
        "sizes learnt by the call); `sizes given` = the same with `vocab_start` / `vocab_size`; "
        "`gather` = `all_gather` of the (N, V_r) slices (padded to the widest), the plain "
        "`fusedce.cross_entropy` on the (N, V) logits on every rank, the gradient of the local "
        "slice through autograd.",
        "",
        "Bytes: what each rank hands to the collectives in one call (forward + backward), "
        "counted by a shim around `torch.distributed` and checked element for element against "
        "torch.profiler's record of the process group's calls; `formula`: sharded 192 + 12 N "
        "(docs/VOCAB_PARALLEL.md), gather N x max V_r x element size. `ring` = the bytes a ring "
        "algorithm puts on the wire per rank (all_reduce 2 (W-1)/W B, all_gather (W-1) B). "
        f"Time: {env['timing']}.",
        "",
        "| W | N | V | sharded B/rank | = formula | sizes given B/rank | gather B/rank "
        "| = formula | bytes gather / sharded | ring B/rank sharded | ring B/rank gather "
        "| sharded ms | sizes given ms | gather ms | time gather / sharded |",
        "|---:|---:|---:|---:|:-:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        p = row["paths"]
        s, z, g = p.get("sharded", {}), p.get("sharded_sizes", {}), p.get("gather", {})

        def ok(rec: dict[str, Any]) -> str:
            if not rec:
                return "n/a"
            good = rec["formula_ok"] and rec["profiler_agrees"] is not False
            return "yes" if good else "NO"

        lines.append(
            f"| {row['world']} | {row['n']} | {row['v']} | {fmt(s.get('bytes'), ',d')} "
            f"| {ok(s)} | {fmt(z.get('bytes'), ',d')} | {fmt(g.get('bytes'), ',d')} | {ok(g)} "
            f"| {fmt(row.get('bytes_ratio'), ',.0f')} | {fmt(s.get('ring_bytes'), ',.0f')} "
            f"| {fmt(g.get('ring_bytes'), ',.0f')} | {fmt(s.get('ms_median'), '.2f')} "
            f"| {fmt(z.get('ms_median'), '.2f')} | {fmt(g.get('ms_median'), '.2f')} "
            f"| {fmt(row.get('time_ratio'), '.2f')} |"
        )
    rows = report["rows"]
    if rows:
        worst = max(
            (rec["grad_max_abs_diff"] for r in rows for rec in r["paths"].values()), default=0.0
        )
        spread = max(r["loss_spread"] for r in rows)
        lines += [
            "",
            f"Agreement over all cells, paths and ranks: loss spread {spread:.1e}, largest "
            f"|gradient difference| against the first path {worst:.1e}.",
            "",
            f"## Collectives of one call (rank 0, W={rows[0]['world']}, N={rows[0]['n']}, "
            f"V={rows[0]['v']})",
            "",
            "| path | phase | op | dtype | shape handed in | bytes |",
            "|---|---|---|---|---|---:|",
        ]
        for name, rec in rows[0]["paths"].items():
            for c in rec["collectives_rank0"] or [{}]:
                lines.append(
                    f"| {name} | {c.get('phase', '-')} | {c.get('op', 'none')} "
                    f"| {c.get('dtype', '-')} | {c.get('shape', '-')} "
                    f"| {fmt(c.get('bytes'), ',d')} |"
                )
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bytes per rank and call against V, one line per (path, W, N), log-log; False when
    matplotlib is missing."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    for row in report["rows"]:
        for name in ("sharded", "gather"):
            if name in row["paths"]:
                key = (name, row["world"], row["n"])
                series.setdefault(key, []).append((row["v"], row["paths"][name]["bytes"]))
    groups = sorted({(world, n) for _, world, n in series})
    for (name, world, n), pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            [v for v, _ in pts],
            [b for _, b in pts],
            marker="o" if name == "gather" else "s",
            linestyle="-" if name == "gather" else "--",
            color=f"C{groups.index((world, n)) % 10}",  # one colour per (W, N): both paths
            label=f"{name}, W={world}, N={n}",
        )
    if len({world for _, world, _ in series}) > 1:
        ax.text(
            0.02,
            0.22,
            "sharded: the same bytes for every W (its lines overlap)",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("V (classes)")
    ax.set_ylabel("bytes handed to collectives per rank per call")
    env = report["environment"]
    ax.set_title(f"vocab-parallel CE, {env['dtype']}: {env['card'][:40]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_vocab_parallel", description=__doc__.splitlines()[0]
    )
    p.add_argument("--world", default="2", help="process counts, comma-separated (e.g. 2,3)")
    p.add_argument("--n", help="token rows N, comma-separated (default: the device's grid)")
    p.add_argument("--v", help="vocabulary sizes V, comma-separated (default: the device's grid)")
    p.add_argument("--quick", action="store_true", help="a tiny grid (N=64, V=1000,4000)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="logits dtype (fp32 CPU, bf16 CUDA)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {PATHS}")
    p.add_argument("--repeats", type=int, help="timed calls per path (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--card-name", help="name of the machine in the outputs")
    p.add_argument("--out", type=Path, help="output folder (default runs/benchmarks/<time>/)")
    p.add_argument("--overwrite", action="store_true", help=f"allow replacing files in {COMMITTED}")
    p.add_argument("--stem", help="output file name without suffix")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=900.0, help="per process count")
    args = p.parse_args(argv)
    args.device = args.device or pick_device(None).type
    cuda = args.device == "cuda"
    grid = GRID_QUICK if args.quick else GRID_GPU if cuda else GRID_CPU
    try:
        args.worlds = [int(w) for w in csv(args.world)]
        args.ns = [int(x) for x in csv(args.n)] if args.n else list(grid[0])
        args.vs = [int(x) for x in csv(args.v)] if args.v else list(grid[1])
    except ValueError:
        p.error("--world, --n and --v take comma-separated integers")
    if not args.worlds or min(args.worlds) < 2:
        p.error("--world: at least 2 processes (a group of one is the plain function)")
    if min(args.ns) < 1 or min(args.vs) < max(args.worlds):
        p.error("--n must be >= 1 and every V at least the number of processes")
    args.paths = csv(args.paths)
    for name in args.paths:
        if name not in PATHS:
            p.error(f"unknown path {name!r}; choose from {', '.join(PATHS)}")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.repeats is None:
        args.repeats = 20 if cuda else (2 if args.quick else 5)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.out is None:
        args.out = Path("runs/benchmarks") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: each process count in turn, then the outputs and the table."""
    args = parse_args(argv)
    cuda = args.device == "cuda"
    need = max(args.worlds)
    if cuda and torch.cuda.device_count() < need:
        print(
            f"bench_vocab_parallel: the GPU rows need >= {need} GPUs (one per rank, NCCL); "
            f"this machine has {torch.cuda.device_count()}: nothing measured "
            "(--device cpu runs the gloo rows)."
        )
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    env = base_environment(device, args.card_name)
    stem = args.stem or f"{slug(env['card'])}-vocab-parallel-{env['date'][:10]}"
    existing = [q for q in args.out.glob(f"{stem}.*") if q.suffix in (".md", ".json", ".png")]
    if existing and args.out.resolve() == COMMITTED.resolve() and not args.overwrite:
        raise SystemExit(
            f"{existing[0]} exists: the committed results are replaced only with --overwrite "
            "(or choose another --out)"
        )
    env.update(
        {
            "backend": "nccl" if cuda else "gloo",
            "worlds": args.worlds,
            "rank_device": "one GPU per rank"
            if cuda
            else f"{args.cpu_threads} torch thread(s) per rank, {os.cpu_count()} cores",
            "dtype": args.dtype,
            "paths": args.paths,
            "grid": {"n": args.ns, "v": args.vs},
            "timing": f"rank 0's median of {args.repeats} forward + backward calls per path "
            f"after {args.warmup} untimed round(s), the paths interleaved, each call after a "
            "dist.barrier()" + (", CUDA synchronised" if cuda else ""),
        }
    )
    cfg = {
        "device": args.device,
        "dtype": args.dtype,
        "paths": args.paths,
        "cells": [(n, v) for n in args.ns for v in args.vs],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "cpu_threads": args.cpu_threads,
        "pg_timeout_s": 300,
    }
    notes = list(args.note)
    if not cuda:
        notes.append(
            "On the CPU every rank of the gather path computes the loss over all V classes (W "
            "times the sharded path's work) and copies the gathered logits: its extra time is "
            "mostly that, not the transfer."
        )
        crowded = [w for w in args.worlds if w * max(args.cpu_threads, 1) > (os.cpu_count() or 1)]
        if crowded:
            notes.append(
                f"W={', '.join(map(str, crowded))}: more threads than the machine's "
                f"{os.cpu_count()} cores, so the ranks also wait for a core; the times of both "
                "paths include it."
            )
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for world in args.worlds:
        t0 = time.perf_counter()
        print(f"{world} ranks, {len(cfg['cells'])} cells ...", flush=True)
        try:
            ranks = run_world(world, cfg, args.timeout_s)
        except RuntimeError as exc:
            notes.append(f"W={world}: {exc}")
            print(exc, file=sys.stderr, flush=True)
            continue
        for i in range(len(cfg["cells"])):
            rows.append(summarise_cell(world, DTYPES[args.dtype], ranks, i))
            r = rows[-1]
            print(
                f"W={world} N={r['n']} V={r['v']}: bytes/rank "
                + ", ".join(f"{k} {v['bytes']}" for k, v in r["paths"].items())
                + " | ms "
                + ", ".join(f"{k} {fmt(v['ms_median'], '.2f')}" for k, v in r["paths"].items()),
                flush=True,
            )
        print(f"{world} ranks: {time.perf_counter() - t0:.0f} s", flush=True)
    if hasattr(os, "getloadavg"):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    env["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    report = {"environment": env, "notes": notes, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", report)
    (args.out / f"{stem}.md").write_text(markdown(report))
    written = [f"{stem}.md", f"{stem}.json"]
    if rows and plot(report, args.out / f"{stem}.png"):
        written.append(f"{stem}.png")
    print(markdown(report))
    print(f"wrote {', '.join(str(args.out / w) for w in written)}")
    ok = all(
        rec["formula_ok"] and rec["profiler_agrees"] is not False
        for r in rows
        for rec in r["paths"].values()
    )
    if not ok:
        print("bytes differ from the documented formula or from the profiler: see the table")
    return 0 if rows and ok and len(rows) == len(cfg["cells"]) * len(args.worlds) else 1


if __name__ == "__main__":
    sys.exit(main())
