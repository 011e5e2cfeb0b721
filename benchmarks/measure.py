"""Timing and memory, shared by both benchmarks.

* CUDA time: ``triton.testing.do_bench`` median (it warms up and clears the L2 between runs);
* CPU time: ``time.perf_counter`` medians, either of one function within a time budget or of
  several functions called in turn (a shared machine's load then hits all of them alike);
* CUDA memory: ``torch.cuda.max_memory_allocated`` during one call, above what was allocated
  before it;
* CPU memory: the peak-RSS rise of one call (Linux's resettable VmHWM), meant for a fresh child
  process (``run_json_child``) so that measurements share no high-water mark.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
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


_FREEZE_SURVIVORS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "freeze_survivors", default=False
)


@contextlib.contextmanager
def frozen_survivors() -> Iterator[None]:
    """Within it, ``free_memory`` freezes what survives its collection (``gc.freeze``), so the
    next call scans only what was allocated since, not again the whole heap of torch, dynamo and
    matplotlib: a full collection of that heap takes ~0.2 s on a CPU, more than many of the
    measurements it precedes. Frozen objects are still freed by reference counting; only a
    reference cycle among them waits for the exit, where they go back to the collector. The
    benchmarks' entry points run their sweeps in it; a caller of their parts (a test) keeps a
    normal collector."""
    token = _FREEZE_SURVIVORS.set(True)
    try:
        yield
    finally:
        _FREEZE_SURVIVORS.reset(token)
        gc.unfreeze()


def free_memory(device: torch.device) -> None:
    """Drops garbage and (CUDA) the allocator's cached blocks, so a measurement starts clean
    (and, within ``frozen_survivors``, freezes the survivors)."""
    gc.collect()
    if _FREEZE_SURVIVORS.get():
        gc.freeze()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA or host allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_rise_mib(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Runs ``fn`` once; returns its result and ``{"rss_delta_mib": peak RSS during the call
    above the RSS before it, "max_rss_mib": that peak}``.

    Where the peak cannot be reset (not Linux), the lifetime maximum RSS is used: earlier
    transients of the process may then hide the call's rise (run it in a fresh process).
    """
    gc.collect()
    if reset_peak_rss():
        before = proc_status_mib("VmRSS") or 0.0
        out = fn()
        after = proc_status_mib("VmHWM") or 0.0
    else:
        scale = 1 if sys.platform == "darwin" else 1024
        maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MiB
        before = maxrss()
        out = fn()
        after = maxrss()
    return out, {"rss_delta_mib": max(0.0, after - before), "max_rss_mib": after}


def run_json_child(
    cmd: Sequence[str], timeout_s: float | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Runs ``cmd`` (a fresh process) and returns the JSON object on the last line of its
    output, or None when it fails (its stderr's last lines are printed)."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, check=False, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired:
        print(f"child timed out after {timeout_s} s: {' '.join(cmd)}", file=sys.stderr)
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"child failed (exit {proc.returncode}): {tail}", file=sys.stderr)
        return None
    return json.loads(lines[-1])
