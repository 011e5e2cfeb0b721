"""One flat JSON file per benchmark run, so that runs on different cards and dates can be
compared by script: ``<card>-<date>-summary.json``, a list of records

    {"op", "dtype", "N", "D", "V", "provider", "ms", "copy_ms", "peak_mib"}

built from the reports the benchmarks write: ``op`` "ce" from the cross-entropy benchmark's
forward + backward cells (``bench_cross_entropy``; forward-only cells are left out, so that
(op, dtype, N, V, provider) names one record), with the logits' copy as provider "copy"; ``op``
"lce" from the linear cross-entropy benchmark (``bench_linear_cross_entropy``). ``D`` is null
for "ce", ``copy_ms`` null for "lce", ``peak_mib`` null where not measured. Providers keep the
benchmarks' names ("fusedce", "eager", "compile", "liger", "quack", and variants such as
"fusedce_inplace"); only measurements that ran ("ok") are listed. The records of every report
given are sorted by op, dtype, shape and provider.

    python -m benchmarks.summary REPORT_OR_FOLDER ... [--out-dir DIR]

The card and date of the file name are those of the reports (all from one card, or it refuses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import slug

FIELDS = ("op", "dtype", "N", "D", "V", "provider", "ms", "copy_ms", "peak_mib")


def _record(**values: Any) -> dict[str, Any]:
    return {k: values.get(k) for k in FIELDS}


def ce_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of a cross-entropy benchmark report (its forward + backward cells)."""
    out = []
    for cell in report["cells"]:
        if cell.get("mode") != "fwd_bwd" or cell.get("status") != "ok":
            continue
        shape = {"op": "ce", "dtype": cell["dtype"], "N": cell["N"], "D": None, "V": cell["V"]}
        copy_ms = cell["copy"]["ms"]
        out.append(_record(**shape, provider="copy", ms=copy_ms, copy_ms=copy_ms))
        for name, res in cell["providers"].items():
            if res.get("status") == "ok":
                peak = res.get("peak_MiB")
                out.append(
                    _record(**shape, provider=name, ms=res["ms"], copy_ms=copy_ms, peak_mib=peak)
                )
    return out


def lce_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of a linear cross-entropy benchmark report (one shape, one row per provider;
    ``peak_mib`` absent where it ran with ``--no-memory``)."""
    shape = report["environment"]["shape"]
    fixed = {"op": "lce", "dtype": shape["dtype"], "N": shape["n"], "D": shape["d"]}
    out = []
    for r in report["results"]:
        if r.get("status") == "ok" and r.get("time_ms") is not None:
            ms, peak = r["time_ms"], r.get("peak_mib")
            out.append(_record(**fixed, V=shape["v"], provider=r["provider"], ms=ms, peak_mib=peak))
    return out


def _reports(paths: list[Path]) -> list[dict[str, Any]]:
    """The benchmark reports among ``paths`` (JSON files, or folders of them); other JSON files
    (a summary, a settings file) are passed over."""
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise SystemExit(f"summary: {p} does not exist")
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    out = []
    for f in files:
        data = json.loads(f.read_text())
        if isinstance(data, dict) and ("cells" in data or "results" in data):
            out.append(data)
    return out


def _environment(report: dict[str, Any]) -> dict[str, Any]:
    return report.get("env") or report["environment"]


def summarise(paths: list[Path]) -> tuple[str, list[dict[str, Any]]]:
    """(file stem ``<card>-<date>``, records) of the reports found under ``paths``."""
    reports = _reports(paths)
    if not reports:
        raise SystemExit(f"summary: no benchmark report among {', '.join(map(str, paths))}")
    cards = {_environment(r)["card"] for r in reports}
    if len(cards) > 1:
        raise SystemExit(f"summary: the reports come from several cards ({sorted(cards)})")
    records = []
    for r in reports:
        if "cells" in r:
            records += ce_records(r)
        elif "shape" in _environment(r):
            records += lce_records(r)
    records.sort(key=lambda x: (x["op"], x["dtype"], x["N"], x["D"] or 0, x["V"], x["provider"]))
    date = min(_environment(r)["date"][:10] for r in reports)
    return f"{slug(cards.pop())}-{date}", records


def main(argv: list[str] | None = None) -> Path:
    """Entry point: writes the summary next to the reports (or into ``--out-dir``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", type=Path, nargs="+", help="benchmark JSON reports, or folders")
    p.add_argument("--out-dir", type=Path, default=None, help="default: the first path's folder")
    args = p.parse_args(argv)
    stem, records = summarise(args.paths)
    first = args.paths[0]
    out_dir = args.out_dir or (first if first.is_dir() else first.parent)
    path = out_dir / f"{stem}-summary.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {path} ({len(records)} records)")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
