"""``python -m benchmarks.bench_cross_entropy --quick``: seconds, a fresh output folder by default,
and never a silent overwrite of the committed results in ``benchmarks/results``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results"


def _bench(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.bench_cross_entropy", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_quick_is_fast_and_writes_a_fresh_folder(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = _bench(tmp_path, "--quick", "--device", "cpu")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (out,) = (tmp_path / "runs" / "benchmarks").iterdir()  # the default: a fresh folder
    assert {p.suffix for p in out.iterdir()} == {".md", ".json", ".png"}
    report = json.loads(next(out.glob("*.json")).read_text())
    assert "fusedce" in report["providers"] and "compile" not in report["providers"]
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"  # ~10 s on an idle 2-core machine


def test_committed_results_need_overwrite(tmp_path: Path) -> None:
    (existing, *_) = sorted(COMMITTED.glob("cpu-*.json"))
    before = existing.read_bytes()
    proc = _bench(
        tmp_path, "--quick", "--device", "cpu", "--out", str(COMMITTED), "--stem", existing.stem
    )
    assert proc.returncode != 0
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert existing.read_bytes() == before
