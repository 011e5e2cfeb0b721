"""benchmarks/summary.py: the flat records every benchmark run leaves for scripts, checked on
the committed GPU run's reports (its committed summary is what the script writes from them)
and on made-up reports for the rules (forward-only cells and failed measurements left out, one
card per summary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import summary

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _ce_report(card: str = "NVIDIA H100 80GB HBM3") -> dict:
    ok = {"status": "ok", "ms": 2.0, "peak_MiB": 10.0}
    return {
        "env": {"card": card, "date": "2026-12-07T10:00:00Z"},
        "cells": [
            {
                "mode": "fwd_bwd", "dtype": "bf16", "N": 8, "V": 5, "status": "ok",
                "copy": {"ms": 1.0},
                "providers": {"fusedce": ok, "liger": {"status": "out of memory"}},
            },
            {
                "mode": "fwd", "dtype": "bf16", "N": 8, "V": 5, "status": "ok",
                "copy": {"ms": 1.0}, "providers": {"fusedce": ok},
            },
            {"mode": "fwd_bwd", "dtype": "fp32", "N": 8, "V": 5, "status": "error: x"},
        ],
    }  # fmt: skip


def _lce_report(card: str = "NVIDIA H100 80GB HBM3") -> dict:
    return {
        "environment": {
            "card": card, "date": "2026-12-08T01:00:00Z",
            "shape": {"n": 8, "d": 4, "v": 5, "dtype": "bf16"},
        },
        "results": [
            {"provider": "fusedce", "status": "ok", "time_ms": 3.0, "peak_mib": 1.5},
            {"provider": "eager", "status": "out of memory"},
        ],
    }  # fmt: skip


def test_committed_gpu_summary_is_what_its_reports_give() -> None:
    (committed,) = RESULTS.glob("nvidia-h200-2026-11-26-summary.json")
    reports = [RESULTS / "nvidia-h200-2026-11-26.json", RESULTS / "nvidia-h200-lce-2026-11-26.json"]
    stem, records = summary.summarise(reports)
    assert stem == "nvidia-h200-2026-11-26"
    assert json.loads(committed.read_text()) == records
    keys = [(r["op"], r["dtype"], r["N"], r["D"], r["V"], r["provider"]) for r in records]
    assert len(keys) == len(set(keys))  # one record per op, shape and provider
    assert all(list(r) == list(summary.FIELDS) and r["ms"] > 0 for r in records)
    ce = [r for r in records if r["op"] == "ce"]
    assert {r["provider"] for r in ce} >= {"copy", "fusedce", "eager", "compile", "liger"}
    assert all(r["D"] is None and r["copy_ms"] > 0 for r in ce)
    lce = [r for r in records if r["op"] == "lce"]
    assert {(r["N"], r["D"], r["V"]) for r in lce} == {(8192, 4096, 128256)}
    assert all(r["copy_ms"] is None and r["peak_mib"] > 0 for r in lce)


def test_records_follow_the_rules(tmp_path: Path) -> None:
    (tmp_path / "ce.json").write_text(json.dumps(_ce_report()))
    (tmp_path / "lce.json").write_text(json.dumps(_lce_report()))
    (tmp_path / "settings.json").write_text(json.dumps({"other": 1}))  # not a report: passed over
    path = summary.main([str(tmp_path)])
    assert path == tmp_path / "nvidia-h100-80gb-hbm3-2026-12-07-summary.json"
    assert json.loads(path.read_text()) == [
        {"op": "ce", "dtype": "bf16", "N": 8, "D": None, "V": 5, "provider": "copy",
         "ms": 1.0, "copy_ms": 1.0, "peak_mib": None},
        {"op": "ce", "dtype": "bf16", "N": 8, "D": None, "V": 5, "provider": "fusedce",
         "ms": 2.0, "copy_ms": 1.0, "peak_mib": 10.0},
        {"op": "lce", "dtype": "bf16", "N": 8, "D": 4, "V": 5, "provider": "fusedce",
         "ms": 3.0, "copy_ms": None, "peak_mib": 1.5},
    ]  # fmt: skip
    # A second run finds its own summary among the files and passes over it too.
    assert summary.main([str(tmp_path)]) == path


def test_refuses_mixed_cards_and_empty_input(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_ce_report("NVIDIA H200")))
    (tmp_path / "b.json").write_text(json.dumps(_lce_report()))
    with pytest.raises(SystemExit, match="several cards"):
        summary.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="missing does not exist"):
        summary.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no benchmark report"):
        summary.main([str(tmp_path / "empty")])
