"""The vocabulary-parallel benchmark: a tiny run on 2 CPU processes (gloo) counts the bytes each
rank sends per call. The sharded loss sends the same bytes whatever V (the documented
192 + 12 N), the gathered logits grow with V."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_vocab_parallel import (
    gather_formula_bytes,
    parse_args,
    sharded_formula_bytes,
    split_widths,
)

ROOT = Path(__file__).resolve().parents[1]
N, VS = 48, (999, 4000)


def test_formulas_and_command_line() -> None:
    import torch

    assert sharded_formula_bytes(N, 2, True, torch.float32) == 24 * 8 + 3 * N * 4
    assert sharded_formula_bytes(N, 3, False, torch.bfloat16) == 3 * N * 4
    assert sharded_formula_bytes(N, 2, False, torch.float64) == 3 * N * 8
    assert split_widths(1001, 3) == [334, 334, 333]
    assert gather_formula_bytes(N, [334, 334, 333], torch.bfloat16) == N * 334 * 2
    args = parse_args(["--device", "cpu", "--world", "2,3", "--n", "8", "--v", "10,20"])
    assert args.worlds == [2, 3] and args.ns == [8] and args.vs == [10, 20]
    assert args.dtype == "fp32" and args.out.parts[:2] == ("runs", "benchmarks")
    for bad in (["--world", "1"], ["--paths", "nope"], ["--v", "1"], ["--n", "x"]):
        with pytest.raises(SystemExit):
            parse_args(["--device", "cpu", *bad])


def test_bytes_per_call_sharded_constant_gather_grows(tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "TRITON_INTERPRET": "0"}
    cmd = [
        sys.executable, "-m", "benchmarks.bench_vocab_parallel", "--device", "cpu",
        "--world", "2", "--n", str(N), "--v", ",".join(map(str, VS)), "--repeats", "1",
        "--out", str(tmp_path), "--stem", "vp",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ActivityProfilerHandler" not in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "vp.json").read_text())
    text = (tmp_path / "vp.md").read_text()
    assert "| 2 | 48 | 999 | 768 | yes |" in text, text
    assert (tmp_path / "vp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env_ = report["environment"]
    assert env_["card"].startswith("CPU") and env_["backend"] == "gloo" and env_["git_commit"]

    rows = {r["v"]: r for r in report["rows"]}
    assert sorted(rows) == list(VS)
    sharded = [rows[v]["paths"]["sharded"] for v in VS]
    sizes = [rows[v]["paths"]["sharded_sizes"] for v in VS]
    gather = [rows[v]["paths"]["gather"] for v in VS]
    # Sharded: identical on both ranks and for both V, equal to the documented formula, nothing
    # in backward; the shim's count matches the profiler's record of the gloo calls.
    assert sharded[0]["bytes_per_rank"] == sharded[1]["bytes_per_rank"] == [24 * 8 + 12 * N] * 2
    assert sizes[0]["bytes_per_rank"] == sizes[1]["bytes_per_rank"] == [12 * N] * 2
    for rec in sharded + sizes + gather:
        assert rec["formula_ok"] and rec["profiler_agrees"] is True, rec
        assert rec["bytes_bwd"] == 0
    ops = [(c["op"], c["dtype"], c["shape"]) for c in sharded[0]["collectives_rank0"]]
    assert ops == [
        ("all_gather", "int64", [[24]]),
        ("all_reduce", "float32", [[N]]),
        ("all_reduce", "float32", [[2, N]]),
    ]
    # Gather: each rank's (N, max V_r) float32 slice; grows with V.
    assert [g["bytes"] for g in gather] == [N * 500 * 4, N * 2000 * 4]
    assert gather[1]["bytes"] > gather[0]["bytes"] > sharded[0]["bytes"]
    # The three paths give the same loss and the same gradient slices.
    for r in report["rows"]:
        assert r["loss_spread"] < 1e-5
        assert all(rec["grad_max_abs_diff"] < 1e-6 for rec in r["paths"].values())
        assert all(rec["ms_median"] > 0 for rec in r["paths"].values())


def test_gpu_rows_need_two_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With CUDA asked for and fewer GPUs than ranks: a clear note, exit 0, nothing written."""
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has >= 2 GPUs")
    from benchmarks.bench_vocab_parallel import main

    assert main(["--device", "cuda", "--world", "2", "--out", str(tmp_path)]) == 0
    assert "GPU rows need >= 2 GPUs" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
