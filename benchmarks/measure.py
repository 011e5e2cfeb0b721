"""Timing and memory, shared by both benchmarks.

* CUDA time: ``triton.testing.do_bench`` median (it warms up and clears the L2 between runs);
* CPU time: ``time.perf_counter`` medians, either of one function within a time budget or of
  several functions called in turn (a shared machine's load then hits all of them alike);
* CUDA memory: ``torch.cuda.max_memory_allocated`` during one call, above what was allocated
  before it.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

MiB = 1 << 20


def sync(device: torch.device) -> None:
    """Waits for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_median_ms(
    fn: Callable[[], Any],
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds of one call of ``fn`` on CUDA, by ``triton.testing.do_bench``.

    Args:
        fn: the call to time.
        warmup_ms: do_bench's warm-up time.
        rep_ms: do_bench's repetition time.
        grad_to_none: tensors whose ``.grad`` is reset before each call (so that backward does
            not time an accumulation into an existing gradient).
    """
    from triton.testing import do_bench

    return float(
        do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    )


def cpu_median_ms(
    fn: Callable[[], Any], budget_s: float, min_reps: int = 3, max_reps: int = 200
) -> float:
    """Median milliseconds of one call of ``fn`` (already warm): at least ``min_reps`` calls,
    more while ``budget_s`` seconds last (at most ``max_reps``)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (
        time.perf_counter() - start < budget_s and len(times) < max_reps
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cpu_interleaved_ms(
    fns: Mapping[str, Callable[[], Any]], repeats: int
) -> dict[str, list[float]]:
    """Milliseconds of ``repeats`` calls of each function, taken round-robin after one warm-up
    round: load from other processes spreads evenly over the functions. Returns the samples."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats + 1):  # round 0 is the warm-up
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def host_ms_per_call(fn: Callable[[], Any], device: torch.device, per_batch_ms: float) -> float:
    """Wall time per call of back-to-back calls, synchronised once per batch (median of 5)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, min(1000, int(per_batch_ms / 1e3 / one)))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples) * 1e3


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float | None]:
    """Runs ``fn`` once; returns its result and the peak CUDA memory (MiB) it allocated beyond
    what was allocated at the start (None off CUDA)."""
    if device.type != "cuda":
        return fn(), None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    return out, (torch.cuda.max_memory_allocated(device) - base) / MiB


def free_memory(device: torch.device) -> None:
    """Drops garbage and (CUDA) the allocator's cached blocks, so a measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA or host allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
