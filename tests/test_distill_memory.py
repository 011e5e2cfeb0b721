"""Peak memory on the CPU: the fused distillation losses stay at the fused linear
cross-entropy's peak plus O(N k) (sparse teacher) or one more chunk (dense teacher), far below
the logits path (``benchmarks.distill_memory``; each provider in a fresh process)."""

from __future__ import annotations

import pytest

from benchmarks import distill_memory

pytestmark = pytest.mark.slow


def test_fused_forms_peak_near_linear_cross_entropy():
    # N=2048, V=8192: 64 MiB of float32 logits against 8 MiB chunks of 256 rows; k=64.
    n, d, v, k, chunk = 2048, 64, 8192, 64, 256
    res = distill_memory.measure(n, d, v, k, chunk)
    assert all(r is not None for r in res.values()), res
    rise = {p: r["rss_delta_mib"] for p, r in res.items()}
    chunk_mib = chunk * v * 4 / 2**20
    nk_mib = n * k * 12 / 2**20
    slack = 4.0  # allocator granularity, the torch rows' 2 MiB blocks
    assert rise["sparse"] <= rise["lce"] + nk_mib + slack, rise
    assert rise["dense"] <= rise["lce"] + chunk_mib + slack, rise
    assert rise["logits"] >= n * v * 4 / 2**20, rise
