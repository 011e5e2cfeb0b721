"""benchmarks/bench_integrations.py: a --quick CPU run (tiny Llama, each variant in a fresh
process) writes markdown and JSON with both variants' peak-RSS rise, step time and equal losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from benchmarks.bench_integrations import QUICK, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_writes_outputs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_integrations", "--quick", "--device", "cpu"]
    cmd += ["--out", str(tmp_path), "--stem", "integ"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    report = json.loads((tmp_path / "integ.json").read_text())
    env_ = report["environment"]
    assert env_["card"].startswith("CPU") and env_["torch"] and env_["transformers"]
    assert env_["model"]["vocab"] == QUICK["vocab"] and "VmHWM" in env_["memory_metric"]
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"unpatched", "fusedce"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["peak_mib"] >= 0 and r["max_rss_mib"] > 0 and r["step_ms"] > 0
    # Same seed, same weights and batch: the fused head gives the model's own loss.
    assert rows["fusedce"]["first_loss"] == pytest.approx(rows["unpatched"]["first_loss"], 1e-5)
    summary = report["summary"]
    assert summary["loss_abs_diff"] < 1e-4
    assert summary["step_time_ratio"] > 0 and "peak_ratio" in summary

    md = (tmp_path / "integ.md").read_text()
    assert "| unpatched |" in md and "| fusedce |" in md and "fusedce / unpatched" in md


def test_command_line() -> None:
    args = parse_args(["--quick", "--variants", "fusedce", "--out", "o"])
    assert (args.vocab, args.seq, args.repeats) == (QUICK["vocab"], QUICK["seq"], 1)
    defaults = parse_args([])
    assert (defaults.vocab, defaults.hidden, defaults.layers) == (128256, 64, 2)
    assert (defaults.batch, defaults.seq, defaults.dtype) == (4, 256, "fp32")
    assert defaults.out.parent == Path("runs/benchmarks")
    for bad in (["--variants", "liger"], ["--vocab", "0"], ["--dtype", "fp64"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
