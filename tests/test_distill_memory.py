"""Peak memory on the CPU: the fused distillation losses stay at the fused linear
cross-entropy's peak plus O(N k) (sparse teacher) or one more chunk (dense teacher), far below
the logits path (``benchmarks.distill_memory``; each provider in a fresh process)."""

from __future__ import annotations

from benchmarks import bench_distillation, distill_memory


def test_fused_forms_peak_near_linear_cross_entropy():
    # N=2048, V=8192: 64 MiB of float32 logits against 8 MiB chunks of 256 rows; k=64.
    n, d, v, k, chunk = 2048, 64, 8192, 64, 256
    res = distill_memory.measure(n, d, v, k, chunk)
    assert all(r is not None for r in res.values()), res
    rise = {p: r["rss_delta_mib"] for p, r in res.items()}
    chunk_mib = chunk * v * 4 / 2**20
    nk_mib = n * k * 12 / 2**20
    # Allocator granularity, and the torch rows' few temporaries of 1 MiB blocks (a dense
    # teacher's about six: backends/torch_distill.py).
    slack = 4.0
    assert rise["sparse"] <= rise["lce"] + nk_mib + slack, rise
    assert rise["dense"] <= rise["lce"] + chunk_mib + 2 * slack, rise
    assert rise["logits"] >= n * v * 4 / 2**20, rise


def test_time_benchmark_runs(tmp_path):
    # benchmarks.bench_distillation on the CPU at a tiny shape: one row per provider, each
    # with its ratio to linear_cross_entropy and its goal.
    out = tmp_path / "distill.md"
    argv = ["--shape", "64x16x512", "--dtype", "fp32", "--k", "8", "--device", "cpu"]
    assert bench_distillation.main([*argv, "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["lce", "sparse", "dense"]
