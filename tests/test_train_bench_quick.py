"""``python -m benchmarks.bench_cross_entropy --quick``: seconds, a fresh output folder by default,
and never a silent overwrite of the committed results in ``benchmarks/results``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.cross_entropy.sweep import MODES, build_sweep

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results"


def _bench(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.bench_cross_entropy", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_quick_is_small_and_writes_a_fresh_folder(tmp_path: Path) -> None:
    proc = _bench(tmp_path, "--quick", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (out,) = (tmp_path / "runs" / "benchmarks").iterdir()  # the default: a fresh folder
    assert {p.suffix for p in out.iterdir()} == {".md", ".json", ".png"}
    report = json.loads(next(out.glob("*.json")).read_text())
    assert "fusedce" in report["providers"] and "compile" not in report["providers"]
    # Quick means the tiny CPU sweep (seconds on an idle 2-core machine; speed itself is the
    # benchmark's business, not a test's): every cell of it, nothing more.
    quick = build_sweep(False, True, ["bf16", "fp32"], list(MODES), None)
    assert len(report["cells"]) == len(quick) and not report["skipped"]


def test_committed_results_need_overwrite(tmp_path: Path) -> None:
    (existing, *_) = sorted(COMMITTED.glob("cpu-*.json"))
    before = existing.read_bytes()
    proc = _bench(
        tmp_path, "--quick", "--device", "cpu", "--out", str(COMMITTED), "--stem", existing.stem
    )
    assert proc.returncode != 0
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert existing.read_bytes() == before
