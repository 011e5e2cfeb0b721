"""The report: environment, markdown tables, the GB/s plot, and the files (md, JSON, PNG)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import base_environment, fmt, pyplot, write_json
from benchmarks.cross_entropy.providers import EXTRAS, liger_version

# Summary columns of the extras providers: header -> provider (its ms / the plain fusedce ms).
EXTRAS_COLUMNS = {
    "extras / plain": "fusedce_extras",
    "token_weight / plain": "fusedce_token_weight",
    "all / plain": "fusedce_all",
}


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Card, versions, date, commit and how the numbers were taken."""
    return {
        **base_environment(device, args.card_name),
        "liger_kernel": liger_version(),
        "timing": (
            f"triton.testing.do_bench median (warmup {args.warmup_ms} ms, rep {args.rep_ms} ms)"
            if device.type == "cuda"
            else "time.perf_counter median per call (CPU fallback path)"
        ),
        "inputs": "logits randn * 3, targets uniform class indices, reduction mean",
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "busy_cores": getattr(args, "busy_cores", 0),
        "pct_copy": "achieved GB/s (floor bytes) / copy GB/s (read + write of the logits)",
    }


def _sorted_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"fwd_bwd": 0, "fwd": 1}
    return sorted(cells, key=lambda c: (order[c["mode"]], c["dtype"], c["V"], c["N"]))


def summary_table(cells: list[dict[str, Any]]) -> list[str]:
    """One row per cell: the floor, fusedce, its speed-up over each rival and the cost of the
    one-pass extras (extras provider ms / fusedce ms)."""
    head = (
        "| mode | dtype | N | V | logits MB | copy ms | fusedce ms | % of copy | x eager "
        "| x compile | x liger | inplace ms | nocheck ms | "
        + " | ".join(EXTRAS_COLUMNS)
        + " | loss err |"
    )
    lines = [head, "|" + "---|" * (14 + len(EXTRAS_COLUMNS))]
    for c in _sorted_cells(cells):
        if c.get("status") != "ok":
            lines.append(f"| {c['mode']} | {c['dtype']} | {c['N']} | {c['V']} | {c['status']} |")
            continue
        p = c["providers"]
        f = p.get("fusedce", {})
        sp = f.get("speedup", {})
        mb = c["floor_bytes"] / (2 if c["mode"] == "fwd_bwd" else 1) / 1e6
        lines.append(
            f"| {c['mode']} | {c['dtype']} | {c['N']} | {c['V']} | {mb:.1f} "
            f"| {fmt(c['copy']['ms'], '.4f')} | {fmt(f.get('ms'), '.4f')} "
            f"| {fmt(f.get('pct_copy'), '.1f')} | {fmt(sp.get('eager'), '.2f')} "
            f"| {fmt(sp.get('compile'), '.2f')} | {fmt(sp.get('liger'), '.2f')} "
            f"| {fmt(p.get('fusedce_inplace', {}).get('ms'), '.4f')} "
            f"| {fmt(p.get('fusedce_nocheck', {}).get('ms'), '.4f')} | "
            + " | ".join(fmt(p.get(n, {}).get("vs_plain"), ".3f") for n in EXTRAS_COLUMNS.values())
            + f" | {fmt(f.get('loss_err'), '.1e')} |"
        )
    return lines


def detail_table(cells: list[dict[str, Any]]) -> list[str]:
    """One row per (cell, provider), the copy floor first."""
    head = (
        "| mode | dtype | N | V | provider | ms | GB/s | % of copy | peak extra MiB "
        "| host ms/call | loss err | grad rel err | status |"
    )
    lines = [head, "|" + "---|" * 13]
    for c in _sorted_cells(cells):
        if c.get("status") != "ok":
            continue
        key = f"| {c['mode']} | {c['dtype']} | {c['N']} | {c['V']}"
        cp = c["copy"]
        lines.append(
            f"{key} | copy (floor) | {fmt(cp['ms'], '.4f')} | {fmt(cp['GBps'], '.1f')} "
            f"| 100.0 | {fmt(cp['peak_MiB'], '.1f')} | n/a | n/a | n/a | ok |"
        )
        for name, r in c["providers"].items():
            if r.get("status") != "ok":
                lines.append(f"{key} | {name} | | | | | | | | {r.get('status')} |")
                continue
            lines.append(
                f"{key} | {name} | {fmt(r['ms'], '.4f')} | {fmt(r['GBps'], '.1f')} "
                f"| {fmt(r['pct_copy'], '.1f')} | {fmt(r['peak_MiB'], '.1f')} "
                f"| {fmt(r.get('host_ms'), '.4f')} | {fmt(r['loss_err'], '.1e')} "
                f"| {fmt(r['grad_rel_err'], '.1e')} | ok |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown."""
    env = report["env"]
    lines = [
        f"# Cross-entropy benchmark: {env['card']}, {env['date'][:10]}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, liger_kernel {env['liger_kernel']}, "
        f"python {env['python']}, commit {env['git_commit']}. Timing: {env['timing']}.",
        f"Inputs: {env['inputs']}. % of copy: {env['pct_copy']}.",
        "",
    ]
    if not env["device"].startswith("cuda"):
        lines += [
            "**CPU run: these numbers show that the benchmark's plumbing works (the torch",
            "fallback path on a CPU), not GPU speed. Peak memory is n/a on CPU.**",
            "",
        ]
    lines += [f"- {note}" for note in report["notes"]]
    lines += [
        "",
        f"Cells run: {len(report['cells'])}, skipped: {len(report['skipped'])}, "
        f"elapsed {report['elapsed_s']:.1f} s.",
        "",
        "## Summary",
        "",
        "x rival = rival ms / fusedce ms (above 1: fusedce is faster). inplace / nocheck: fusedce",
        "with inplace_backward=True / with the target range check (a host sync) switched off.",
        "X / plain: the one-pass extras' cost, that provider's ms / fusedce ms in the same cell",
        "(goal on a GPU: at most 1.03). Their options:",
        "",
        *[f"- `{name}`: {extras.text()}" for name, extras in EXTRAS.items()],
        "",
        *summary_table(report["cells"]),
        "",
        "## Every provider",
        "",
        "peak extra MiB: torch.cuda.max_memory_allocated during one step minus the memory",
        "allocated before it (the gradient included). host ms/call: wall time per call of",
        "back-to-back calls (only where the device time is under 1 ms). loss err: |loss - float64",
        "reference| over all rows; grad rel err: ||g - g_ref|| / ||g_ref|| over up to 64 rows",
        "(an extras provider against the float64 reference of its own loss). Token weights:",
        "uniform in [0, 1).",
        "",
        *detail_table(report["cells"]),
        "",
    ]
    if report["skipped"]:
        lines += ["## Skipped", ""]
        lines += [f"- {s['cell']}: {s['reason']}" for s in report["skipped"]]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """GB/s against V per provider, one panel per (dtype, mode); the copy rate dashed."""
    plt = pyplot()
    cells = [c for c in report["cells"] if c.get("status") == "ok" and c["kind"] != "latency"]
    rank = {"bf16": 0, "fp16": 1, "fp32": 2, "fwd_bwd": 0, "fwd": 1}
    panels = sorted(
        {(c["dtype"], c["mode"]) for c in cells}, key=lambda p: (rank[p[0]], rank[p[1]])
    )
    panels = panels or [("bf16", "fwd_bwd")]
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (dtype, mode) in zip(axes.flat, panels, strict=False):
        mine = [c for c in cells if c["dtype"] == dtype and c["mode"] == mode]
        group = sorted((c for c in mine if c["kind"] != "anchor"), key=lambda c: c["V"])
        if not group:  # only anchor cells: plot those
            group = sorted(mine, key=lambda c: c["V"])
        vs = [c["V"] for c in group]
        ax.plot(vs, [c["copy"]["GBps"] for c in group], "k--", label="copy (floor)")
        names = sorted({n for c in group for n in c["providers"]})
        for name in names:
            pts = [
                (c["V"], c["providers"][name]["GBps"])
                for c in group
                if c["providers"].get(name, {}).get("status") == "ok"
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("V (classes)")
        ax.set_ylabel("GB/s over the floor bytes")
        ax.set_title(f"{dtype}, {mode}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"Cross-entropy, {report['env']['card']}, {report['env']['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, stem: str, with_plot: bool) -> list[Path]:
    """Writes <stem>.json and <stem>.md (and <stem>.png when asked); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    write_json(paths[0], report)
    paths[1].write_text(markdown(report))
    if with_plot:
        try:
            plot(report, out / f"{stem}.png")
            paths.append(out / f"{stem}.png")
        except Exception as exc:  # a broken plot must not lose the numbers
            print(f"plot failed: {exc!r}", flush=True)
    return paths
