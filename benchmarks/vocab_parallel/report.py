"""The vocabulary-parallel benchmark's outputs: one row per (W, N, V) from the ranks' records
(`summarise_cell`), the markdown report and the bytes-against-V plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import fmt, pyplot
from benchmarks.vocab_parallel.counting import gather_formula_bytes, sharded_formula_bytes


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
