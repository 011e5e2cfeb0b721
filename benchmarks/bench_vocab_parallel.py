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

The parts live in ``benchmarks/vocab_parallel/`` (``counting``: the shim, the profiler's record
and the formulas; ``worker``: the ranks, their paths and cells; ``report``: the rows, markdown
and plot); this module is the command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import base_environment, csv, fmt, pick_device, slug, write_json
from benchmarks.vocab_parallel.counting import (
    META_INT64,
    gather_formula_bytes,
    sharded_formula_bytes,
)
from benchmarks.vocab_parallel.report import markdown, plot, summarise_cell
from benchmarks.vocab_parallel.worker import DTYPES, run_world, split_widths

# The names the tests and other benchmarks take from here (their homes are the parts above).
__all__ = [
    "DTYPES",
    "META_INT64",
    "gather_formula_bytes",
    "main",
    "parse_args",
    "sharded_formula_bytes",
    "split_widths",
]

# The committed results: a run replaces files there only with --overwrite.
COMMITTED = Path(__file__).resolve().parent / "results"
PATHS = ("sharded", "sharded_sizes", "gather")
# Grids (N values, V values): the CPU one fits a few minutes on 2 shared cores.
GRID_CPU = ((256, 1024), (8192, 32000, 128256))
GRID_GPU = ((2048, 8192), (32000, 128256, 256000))
GRID_QUICK = ((64,), (1000, 4000))


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
