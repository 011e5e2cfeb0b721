"""The cross-entropy benchmark's plumbing: a --quick CPU run writes sane md, JSON and PNG files.

torch.compile is left out of the subprocess run, and so is fusedce's Inductor-compiled CPU path
(FUSEDCE_CPU_COMPILE=0): their first CPU compiles take seconds to half a minute (2 cores) and
check nothing of the benchmark's plumbing; tests/test_cpu_compiled.py checks that path, the GPU
run the compiled providers.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from benchmarks.common import CPU_CARD_NAME, busy_cores, slug
from benchmarks.cross_entropy import sweep
from benchmarks.cross_entropy.budget import Budget
from benchmarks.measure import free_memory, frozen_survivors

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ("fusedce", "fusedce_inplace", "fusedce_nocheck", "eager")


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "TRITON_INTERPRET": "0", "FUSEDCE_CPU_COMPILE": "0"}
    cmd = [sys.executable, "-m", "benchmarks.bench_cross_entropy", "--out", str(out), *extra]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_quick_cpu_run_writes_sane_outputs(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        "--quick",
        "--device",
        "cpu",
        "--stem",
        "quick",
        "--providers",
        ",".join(PROVIDERS),
        "--busy-cores",
        "1",  # beside a busy core: the mode that shows a shared machine
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md, js, png = (tmp_path / f"quick.{ext}" for ext in ("md", "json", "png"))
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "## Summary" in text and "copy (floor)" in text and "not GPU speed" in text

    report = json.loads(js.read_text())
    env = report["env"]
    assert env["card"].startswith("CPU") and env["torch"] and env["date"] and env["git_commit"]
    assert env["busy_cores"] == 1 and env["cpu_threads"] >= 1
    assert any("busy-looping" in n for n in report["notes"])
    assert report["providers"] == list(PROVIDERS)
    assert not report["skipped"]
    cells = report["cells"]
    modes_dtypes = {(c["mode"], c["dtype"]) for c in cells}
    assert modes_dtypes == {(m, d) for m in sweep.MODES for d in ("bf16", "fp32")}  # the defaults
    for cell in cells:
        assert cell["status"] == "ok", cell
        assert cell["copy"]["ms"] > 0 and cell["copy"]["GBps"] > 0
        expected = set(PROVIDERS) - ({"fusedce_inplace"} if cell["mode"] == "fwd" else set())
        assert set(cell["providers"]) == expected
        for name, res in cell["providers"].items():
            assert res["status"] == "ok", (name, res)
            assert res["ms"] > 0 and res["GBps"] > 0 and res["pct_copy"] > 0
            assert math.isfinite(res["loss"])
            # eager bf16 returns a bf16 loss (8 significant bits); the rest accumulate in fp32.
            tol = 2e-2 if name == "eager" and cell["dtype"] == "bf16" else 1e-4
            assert res["loss_rel_err"] < tol, (name, cell["dtype"], res["loss_rel_err"])
            if cell["mode"] == "fwd_bwd":
                assert res["grad_rel_err"] < (2e-2 if cell["dtype"] == "bf16" else 1e-4)
        assert set(cell["providers"]["fusedce"]["speedup"]) == {"eager"}


def test_time_budget_skips_cells_and_still_writes(tmp_path: Path) -> None:
    proc = _run(
        tmp_path, "--quick", "--device", "cpu", "--stem", "b", "--max-seconds", "0",
        "--providers", "fusedce", "--dtypes", "fp32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["cells"] == [] and len(report["skipped"]) == 4
    assert "time budget" in report["skipped"][0]["reason"]
    assert "## Skipped" in (tmp_path / "b.md").read_text()


def test_sweep_sizes_and_order() -> None:
    cells = sweep.build_sweep(True, False, ["bf16", "fp32"], ["fwd_bwd", "fwd"])
    first = cells[0]
    assert (first.mode, first.dtype) == ("fwd_bwd", "bf16")
    big = [c for c in cells if c.kind == "sweep" and c.v >= 32000]
    assert big and all(c.logits_bytes >= 2**30 for c in big)
    assert all(1 <= c.n <= sweep.MAX_N for c in cells)
    latency = {c.n for c in cells if c.kind == "latency"}
    assert latency == set(sweep.LATENCY_N_GPU)
    anchors = {(c.n, c.v, c.dtype) for c in cells if c.mode == "fwd_bwd" and c.kind != "latency"}
    assert (8192, 128256, "bf16") in anchors and (8192, 32000, "bf16") in anchors
    # fwd_bwd cells come before forward-only ones: the budget cuts from the end.
    modes = [c.mode for c in cells]
    assert modes.index("fwd") > len(modes) - 1 - modes[::-1].index("fwd_bwd")


def test_free_memory_freezes_only_within_a_sweep() -> None:
    """Within ``frozen_survivors`` the survivors of each collection are frozen (so the next
    one scans only new objects) and garbage cycles made since are still collected; outside it,
    and after it, the collector is left as it was."""
    cpu = torch.device("cpu")
    free_memory(cpu)
    assert gc.get_freeze_count() == 0
    with frozen_survivors():
        free_memory(cpu)
        assert gc.get_freeze_count() > 0
        probe = weakref.ref(_Cycle())
        free_memory(cpu)
        assert probe() is None
    assert gc.get_freeze_count() == 0


class _Cycle:
    """Garbage only a collection frees: an object that refers to itself."""

    def __init__(self) -> None:
        self.me = self


def test_busy_cores_start_and_stop() -> None:
    """The busy processes run inside the block and are gone after it."""
    with busy_cores(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_helpers() -> None:
    assert sweep.rows_for(128256, 2, 2**30) == 8192
    assert sweep.rows_for(2, 4, 2**30) == sweep.MAX_N
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug(CPU_CARD_NAME) == "cpu"
    budget = Budget(10.0, durations=[1.0, 100.0, 2.0])
    assert budget.allows_next()
    assert not Budget(0.0).allows_next()
    assert Budget(None).allows_next()


def test_command_line_flags() -> None:
    """Every flag of the command line parses; bad values are usage errors, not tracebacks."""
    from benchmarks.bench_cross_entropy import parse_args

    args = parse_args(
        ["--quick", "--out", "o", "--stem", "s", "--providers", "fusedce,eager",
         "--dtypes", "fp32", "--modes", "fwd", "--shapes", "8x16,4x2", "--max-seconds", "5",
         "--device", "cpu", "--card-name", "c", "--warmup-ms", "1", "--rep-ms", "2",
         "--cpu-budget-s", "0.1", "--cpu-threads", "2", "--note", "n", "--seed", "3"]
    )  # fmt: skip
    assert (args.stem, args.max_seconds, args.cpu_threads, args.seed) == ("s", 5.0, 2, 3)
    assert sweep.parse_shapes(args.shapes) == [(8, 16), (4, 2)]
    for bad in (["--dtypes", "fp64"], ["--modes", "bwd"], ["--shapes", "8x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_cpu_memory_report(tmp_path):
    """benchmarks.cpu_memory: one row per (dtype, shape), both providers measured in fresh
    processes, the gradient's size stated."""
    from benchmarks import cpu_memory

    out = tmp_path / "mem.md"
    assert cpu_memory.main(["--shapes", "64x4096", "--dtypes", "fp32", "--out", str(out)]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| fp32 | 64 | 4096 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "1"  # 64 x 4096 x 4 bytes = 1 MiB of gradient
    assert "failed" not in row and float(cells[4]) >= 0 and float(cells[5]) >= 0


def test_host_profile_runs_on_the_cpu_with_stubbed_kernels() -> None:
    """``profile_host --device cpu`` under the interpreter: every row of the GPU report, timed
    around kernels that launch nothing (the stubs leave the index check's count at zero, so
    the checked call runs to its end); without the interpreter it says what to set."""
    cmd = [sys.executable, "-m", "benchmarks.profile_host", "--device", "cpu"]
    cmd += ["--n", "4", "--v", "64", "--calls", "5"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "kernels stubbed" in proc.stdout.splitlines()[0]
    times = [line for line in proc.stdout.splitlines() if line.endswith("us/call (host)")]
    assert len(times) == 10  # fusedce and eager calls (4), each launcher (4), new_stats, forward
    assert all(float(line.split()[-3]) > 0 for line in times)
    assert "cProfile of 5 fusedce fwd+bwd calls" in proc.stdout

    env["TRITON_INTERPRET"] = "0"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "TRITON_INTERPRET=1" in proc.stderr
    assert "Traceback" not in proc.stderr
