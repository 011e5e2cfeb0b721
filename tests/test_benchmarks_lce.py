"""Smoke test of benchmarks/bench_linear_cross_entropy.py: a tiny CPU run writes sane outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_writes_outputs(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.bench_linear_cross_entropy", "--quick"]
    cmd += ["--device", "cpu", "--n", "48", "--d", "16", "--v", "100", "--dtype", "fp32"]
    cmd += ["--providers", "fusedce,fusedce_lowmem,eager", "--out", str(tmp_path)]
    cmd += ["--stem", "smoke"]
    # Without fusedce's Inductor-compiled CPU rows: their first compile takes seconds and checks
    # nothing of the benchmark (tests/test_cpu_compiled.py checks that path).
    env = {**os.environ, "FUSEDCE_CPU_COMPILE": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    report = json.loads((tmp_path / "smoke.json").read_text())
    env = report["environment"]
    assert env["card"].startswith("CPU") and env["torch"] and env["date"]
    assert env["shape"] == {"n": 48, "d": 16, "v": 100, "dtype": "fp32"}
    rows = {r["provider"]: r for r in report["results"]}
    assert set(rows) == {"fusedce", "fusedce_lowmem", "eager"}
    for r in rows.values():
        assert r["status"] == "ok"
        assert r["time_ms"] > 0
        assert r["peak_mib"] >= 0
        assert r["grad_weight_rel_err"] < 1e-4 and r["grad_input_rel_err"] < 1e-4

    md = (tmp_path / "smoke.md").read_text()
    assert "| fusedce |" in md and "N=48 D=16 V=100" in md
    png = (tmp_path / "smoke.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
