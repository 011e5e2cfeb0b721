"""Cross-entropy benchmark: fusedce against torch eager, torch.compile, Liger and the copy floor.

Run as ``python -m benchmarks.bench_cross_entropy`` (``--help`` for the options). Each cell of the
sweep is one (mode, dtype, N, V); in it every provider is checked against a float64 reference,
its peak extra memory is read around one step (CUDA), and it is timed:

* CUDA: ``triton.testing.do_bench`` medians (it warms up and clears L2 between runs); for calls
  under 1 ms also the host wall time per call of back-to-back calls (launch + sync overhead);
* CPU: ``time.perf_counter`` medians (the fallback path: shows the plumbing, not GPU speed).

The floor of a cell is a copy of the logits into a preallocated buffer (read N*V, write N*V),
timed in the same run. Forward + backward must move exactly those bytes (read the logits once,
write the gradient once), so ``% of copy`` = achieved GB/s over the copy's GB/s. Forward-only must
read N*V once; its GB/s counts those bytes and is compared with the same copy rate.

The parts live in ``benchmarks/cross_entropy/`` (sweep, providers, accuracy, cell, budget,
report); this module is the command line.

Outputs (``--out``; default a fresh ``runs/benchmarks/<date>-<time>/``; the committed results in
``benchmarks/results`` change only with ``--out benchmarks/results --overwrite``):
``<card>-<date>.md`` (tables), ``.json``
(everything, with the card, versions, date and git commit) and ``.png`` (GB/s against V). The
JSON and markdown are rewritten after every cell, so a run stopped by a time limit keeps what it
measured; ``--max-seconds`` skips the remaining cells (and says so) before a limit is reached.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import busy_cores, csv, pick_device, slug
from benchmarks.cross_entropy.budget import Budget, BudgetExceeded, check_stop, stop_on_sigterm
from benchmarks.cross_entropy.cell import Timing, run_cell
from benchmarks.cross_entropy.providers import (
    ALL_PROVIDERS,
    DEFAULT_PROVIDERS,
    available_providers,
)
from benchmarks.cross_entropy.report import environment, summary_table, write_outputs
from benchmarks.cross_entropy.sweep import DTYPES, MODES, Cell, build_sweep, parse_shapes
from benchmarks.measure import frozen_survivors

# The committed results: a run replaces files there only with --overwrite.
COMMITTED = Path("benchmarks/results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cross_entropy", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sweep (CPU-sized, seconds; without torch.compile unless --providers names it)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: a fresh runs/benchmarks/<date>-<time>/)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"allow replacing existing result files in {COMMITTED}/",
    )
    p.add_argument("--stem", help="output file name without suffix (default <card>-<date>)")
    p.add_argument(
        "--providers",
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma-separated, from {', '.join(ALL_PROVIDERS)}",
    )
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--modes", default="fwd_bwd,fwd", help="comma-separated: fwd_bwd, fwd")
    p.add_argument("--shapes", help="shapes instead of the sweep, e.g. 8192x128256,16x32000")
    p.add_argument("--max-seconds", type=float, help="time budget: skip cells that would not fit")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--card-name", help="name of the machine in the outputs")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (CUDA)")
    p.add_argument("--cpu-budget-s", type=float, help="seconds of timed calls per provider (CPU)")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="torch threads on CPU (default 1: on a busy machine, a parallel op waits for its "
        "slowest thread, which adds scheduler quanta of ~10 ms to calls)",
    )
    p.add_argument(
        "--busy-cores",
        type=int,
        default=0,
        help="run the measurements beside this many busy-looping processes (a shared machine "
        "where other jobs take cores); recorded in the report",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument("--seed", type=int, default=0)
    providers_given = any(
        a == "--providers" or a.startswith("--providers=")
        for a in (sys.argv[1:] if argv is None else argv)
    )
    args = p.parse_args(argv)
    if args.quick and not providers_given:  # compiling every cell takes most of a minute on CPU
        args.providers = ",".join(x for x in csv(args.providers) if x != "compile")
    if args.out is None:
        args.out = Path("runs/benchmarks") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for d in csv(args.dtypes):
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    for m in csv(args.modes):
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if args.shapes:
        try:
            parse_shapes(args.shapes)
        except ValueError:
            p.error(f"--shapes {args.shapes!r}: expected NxV items, e.g. 8192x128256,16x32000")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the sweep and writes the outputs; returns the report."""
    device = pick_device(args.device)
    on_cuda = device.type == "cuda"
    budget = Budget(args.max_seconds)
    if not on_cuda and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    providers, notes = available_providers(csv(args.providers), on_cuda)
    notes = list(args.note) + notes
    if args.busy_cores:
        notes.append(
            f"measured beside {args.busy_cores} busy-looping process(es), "
            f"{torch.get_num_threads()} torch thread(s)"
        )
    if on_cuda:  # one static-shape compile per cell: room for all of them
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    quick_budget = 0.03 if args.quick else 0.3
    timing = Timing(args.warmup_ms, args.rep_ms, args.cpu_budget_s or quick_budget)
    shapes = parse_shapes(args.shapes) if args.shapes else None
    cells = build_sweep(on_cuda, args.quick, csv(args.dtypes), csv(args.modes), shapes)
    env = environment(device, args)
    stem = args.stem or f"{slug(env['card'])}-{env['date'][:10]}"
    existing = [p for p in args.out.glob(f"{stem}.*") if p.suffix in (".md", ".json", ".png")]
    committed = args.out.resolve() == (Path(__file__).resolve().parent / "results").resolve()
    if existing and committed and not args.overwrite:
        raise SystemExit(
            f"{existing[0]} exists: the committed results are replaced only with --overwrite "
            "(or choose another --out)"
        )
    report: dict[str, Any] = {
        "env": env,
        "providers": providers,
        "notes": notes,
        "cells": [],
        "skipped": [],
        "elapsed_s": 0.0,
    }
    print(f"{env['card']}: {len(cells)} cells, providers {', '.join(providers)}", flush=True)
    try:
        with stop_on_sigterm(), busy_cores(args.busy_cores), frozen_survivors():
            for i, cell in enumerate(cells):
                check_stop()
                if not budget.allows_next():
                    report["skipped"] += [
                        {"cell": c.label(), "reason": f"time budget of {args.max_seconds:.0f} s"}
                        for c in cells[i:]
                    ]
                    print(f"budget: skipping the last {len(cells) - i} cells", flush=True)
                    break
                t0 = time.perf_counter()
                rec = run_cell(cell, providers, device, timing, args.seed)
                budget.durations.append(time.perf_counter() - t0)
                report["cells"].append(rec)
                report["elapsed_s"] = budget.elapsed()
                print(_progress_line(i, len(cells), cell, rec, budget), flush=True)
                write_outputs(report, args.out, stem, with_plot=False)
    except (BudgetExceeded, KeyboardInterrupt) as exc:
        done = len(report["cells"])
        report["skipped"] += [
            {"cell": c.label(), "reason": f"run stopped ({exc!r})"} for c in cells[done:]
        ]
    finally:
        report["elapsed_s"] = budget.elapsed()
        paths = write_outputs(report, args.out, stem, with_plot=True)
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return report


def _progress_line(i: int, total: int, cell: Cell, rec: dict[str, Any], budget: Budget) -> str:
    parts = [f"[{i + 1}/{total} {budget.elapsed():6.1f}s] {cell.label()}"]
    if rec.get("status") != "ok":
        return parts[0] + f" {rec.get('status')}"
    parts.append(f"copy {rec['copy']['ms']:.4f}")
    for name, r in rec["providers"].items():
        ok = r.get("status") == "ok"
        parts.append(f"{name} {r['ms']:.4f}" if ok else f"{name} {r['status']}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the benchmark and prints the summary table."""
    args = parse_args(argv)
    report = run(args)
    print("\n".join(summary_table(report["cells"])))
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} cells: {report['skipped'][0]['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
