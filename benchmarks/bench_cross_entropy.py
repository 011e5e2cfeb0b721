"""Cross-entropy benchmark: fusedce against torch eager, torch.compile, Liger and the copy floor.

Run as ``python -m benchmarks.bench_cross_entropy`` (``--help`` for the options). Each cell of the
sweep is one (mode, dtype, N, V); in it every provider is checked against a float64 reference,
its peak extra memory is read around one step (CUDA), and it is timed:

* CUDA: ``triton.testing.do_bench`` medians (it warms up and clears L2 between runs); for calls
  under 1 ms also the host wall time per call of back-to-back calls (launch + sync overhead);
* CPU: ``time.perf_counter`` medians (the fallback path: shows the plumbing, not GPU speed).

The floor of a cell is a copy of the logits into a preallocated buffer (read N*V, write N*V),
timed in the same run. Forward + backward must move exactly those bytes (read the logits once,
write the gradient once), so ``% of copy`` = achieved GB/s over the copy's GB/s. Forward-only must
read N*V once; its GB/s counts those bytes and is compared with the same copy rate.

Outputs (``--out``, default ``benchmarks/results``): ``<card>-<date>.md`` (tables), ``.json``
(everything, with the card, versions, date and git commit) and ``.png`` (GB/s against V). The
JSON and markdown are rewritten after every cell, so a run stopped by a time limit keeps what it
measured; ``--max-seconds`` skips the remaining cells (and says so) before a limit is reached.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import base_environment, slug

# ``kernels`` re-exports the function ``cross_entropy``, which hides the module's name.
fce = importlib.import_module("fusedce.cross_entropy")

MODES = ("fwd_bwd", "fwd")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
ALL_PROVIDERS = (
    "fusedce",
    "fusedce_inplace",
    "fusedce_nocheck",
    "eager",
    "compile",
    "liger",
    "fusedce_gluon",
)
# The experimental shared-memory kernel runs only when asked for (--providers ...,fusedce_gluon).
DEFAULT_PROVIDERS = tuple(p for p in ALL_PROVIDERS if p != "fusedce_gluon")
RIVALS = ("eager", "compile", "liger")
# Providers that overwrite the logits with the gradient: they get their own copy of the input.
DESTRUCTIVE = ("fusedce_inplace", "liger")
SWEEP_V = (2, 1024, 32000, 50257, 128256, 256000)
LATENCY_V = 32000
LATENCY_N_GPU = (1, 16, 256, 2048)
LATENCY_N_CPU = (1, 16, 256)
# Shapes of the H200 anchors (/work/shared/anchors), forward + backward, for direct comparison.
ANCHOR_SHAPES = ((8192, 32000, "bf16"), (8192, 128256, "bf16"), (4096, 256000, "bf16"))
ANCHOR_SHAPES_FP32 = ((8192, 128256, "fp32"),)
QUICK_SHAPES = ((1024, 2), (16, 32000))
MAX_N = 65536
GPU_SWEEP_BYTES = 2**30  # big-V rows: logits of at least 1 GiB (several times the L2)
CPU_SWEEP_BYTES = 16 * 2**20
CPU_SWEEP_V = (2, 1024, 32000, 50257, 128256)
REF_CHUNK_ELEMS = 2**25  # float64 reference, computed over row chunks of this many elements
GRAD_SAMPLE_ROWS = 64
HOST_TIMING_BELOW_MS = 1.0


class BudgetExceeded(BaseException):
    """Raised by the SIGTERM handler so that a killed run still writes what it measured.

    A BaseException (like KeyboardInterrupt): the per-provider ``except Exception`` must not
    swallow it.
    """


# ------------------------------------------------------------------------------------------
# Sweep
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One benchmark cell: a mode, a dtype and a logits shape (N, V)."""

    mode: str
    dtype: str
    n: int
    v: int
    kind: str  # "sweep", "latency", "anchor", "quick" or "custom"

    @property
    def elem(self) -> int:
        """Bytes per logit."""
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def logits_bytes(self) -> int:
        """Bytes of the logits, N * V * elem."""
        return self.n * self.v * self.elem

    @property
    def floor_bytes(self) -> int:
        """Fewest bytes the mode must move: 2 N V elem (fwd+bwd) or N V elem (forward only)."""
        return self.logits_bytes * (2 if self.mode == "fwd_bwd" else 1)

    def label(self) -> str:
        """Short text for logs."""
        return f"{self.mode:7s} {self.dtype:4s} N={self.n:<6d} V={self.v:<6d} ({self.kind})"


def rows_for(v: int, elem: int, target_bytes: int) -> int:
    """Smallest power-of-two N (at most MAX_N) with N * v * elem >= target_bytes."""
    need = max(1, math.ceil(target_bytes / (v * elem)))
    return min(MAX_N, 1 << (need - 1).bit_length())


def build_sweep(
    on_cuda: bool,
    quick: bool,
    dtypes: Iterable[str],
    modes: Iterable[str],
    shapes: list[tuple[int, int]] | None = None,
) -> list[Cell]:
    """The cells to run, most important first (the order the time budget cuts from the end).

    Order: forward+backward before forward-only, bf16 before fp32; within that the V sweep
    (large V first), then the anchor shapes, then the small-N latency rows.
    """
    cells: list[Cell] = []
    for mode in modes:
        for dtype in dtypes:
            elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
            group: list[Cell] = []
            if shapes:
                group += [Cell(mode, dtype, n, v, "custom") for n, v in shapes]
            elif quick:
                group += [Cell(mode, dtype, n, v, "quick") for n, v in QUICK_SHAPES]
            else:
                sweep_v = SWEEP_V if on_cuda else CPU_SWEEP_V
                target = GPU_SWEEP_BYTES if on_cuda else CPU_SWEEP_BYTES
                for v in sorted(sweep_v, reverse=True):
                    group.append(Cell(mode, dtype, rows_for(v, elem, target), v, "sweep"))
                if on_cuda and mode == "fwd_bwd":
                    anchors = ANCHOR_SHAPES if dtype == "bf16" else ANCHOR_SHAPES_FP32
                    have = {(c.n, c.v) for c in group}
                    group += [
                        Cell(mode, dtype, n, v, "anchor")
                        for n, v, d in anchors
                        if d == dtype and (n, v) not in have
                    ]
                lat_n = LATENCY_N_GPU if on_cuda else LATENCY_N_CPU
                have = {(c.n, c.v) for c in group}
                group += [
                    Cell(mode, dtype, n, LATENCY_V, "latency")
                    for n in lat_n
                    if (n, LATENCY_V) not in have
                ]
            cells += group
    return cells


# ------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _torch_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def _fused(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return fce.cross_entropy(logits, target)


def _fused_inplace(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return fce.cross_entropy(logits, target, inplace_backward=True)


def _fused_nocheck(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    previous = fce._CHECK_TARGETS
    fce.set_target_check(False)
    try:
        return fce.cross_entropy(logits, target)
    finally:
        fce.set_target_check(previous)


def _fused_gluon(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fusedce with the experimental shared-memory kernel on (FUSEDCE_GLUON=1 for one call)."""
    gk = importlib.import_module("fusedce.gluon_cross_entropy")
    if not gk.supports(logits, target, None):
        raise RuntimeError("shape not covered by the shared-memory kernel (see its supports())")
    previous = fce._GLUON
    fce.gluon_cross_entropy = gk
    fce._GLUON = True
    try:
        return fce.cross_entropy(logits, target)
    finally:
        fce._GLUON = previous


def gluon_available(on_cuda: bool) -> str | None:
    """Why the shared-memory kernel cannot run here, or None when it can."""
    if not on_cuda:
        return "no CUDA device"
    if torch.cuda.get_device_capability()[0] != 9:
        return "not a Hopper GPU"
    try:
        importlib.import_module("fusedce.gluon_cross_entropy")
    except ImportError as exc:
        return f"Gluon not importable ({exc})"
    return None


def liger_version() -> str | None:
    """Liger-Kernel's version if ``liger_kernel`` imports, else None."""
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("liger_kernel", "liger-kernel"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def make_loss_fn(name: str) -> LossFn:
    """The loss function of a provider (a fresh torch.compile for ``compile``)."""
    if name == "fusedce":
        return _fused
    if name == "fusedce_inplace":
        return _fused_inplace
    if name == "fusedce_nocheck":
        return _fused_nocheck
    if name == "fusedce_gluon":
        return _fused_gluon
    if name == "eager":
        return _torch_ce
    if name == "compile":
        # A fresh static-shape compile per cell: no recompile limit falls back to eager.
        torch._dynamo.reset()
        return torch.compile(_torch_ce, dynamic=False)
    if name == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss()
    raise ValueError(f"unknown provider {name!r}")


def available_providers(requested: Iterable[str], on_cuda: bool) -> tuple[list[str], list[str]]:
    """(providers to run, notes on the ones left out)."""
    run, notes = [], []
    for name in requested:
        if name not in ALL_PROVIDERS:
            raise SystemExit(f"unknown provider {name!r}; choose from {', '.join(ALL_PROVIDERS)}")
        if name == "liger" and (not on_cuda or liger_version() is None):
            why = "no CUDA device" if not on_cuda else "liger_kernel not importable"
            notes.append(f"liger skipped: {why}")
            continue
        if name == "fusedce_gluon" and (why := gluon_available(on_cuda)):
            notes.append(f"fusedce_gluon skipped: {why}")
            continue
        run.append(name)
    return run, notes


def make_step(loss_fn: LossFn, mode: str) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """One benchmark step: the loss (fwd) or the loss and d loss / d logits (fwd_bwd)."""
    if mode == "fwd":

        def step(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
            with torch.no_grad():
                return loss_fn(x, t), None

    else:

        def step(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss = loss_fn(x, t)
            (grad,) = torch.autograd.grad(loss, x)
            return loss, grad

    return step


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """How to time: do_bench windows on CUDA, a per-call budget on CPU."""

    warmup_ms: float = 10.0
    rep_ms: float = 100.0
    cpu_budget_s: float = 0.3
    cpu_min_reps: int = 3


def sync(device: torch.device) -> None:
    """Waits for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, timing: Timing) -> float:
    """Median milliseconds of one call of ``fn`` (already warm)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median"))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < timing.cpu_min_reps or (
        time.perf_counter() - start < timing.cpu_budget_s and len(times) < 200
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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
    """Runs ``fn`` once; returns its result and the peak memory it allocated beyond the start."""
    if device.type != "cuda":
        return fn(), None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20


def reference_loss(x: torch.Tensor, t: torch.Tensor) -> float:
    """Mean cross-entropy in float64 over all rows (row chunks bound the float64 copy)."""
    n, v = x.shape
    rows = max(1, REF_CHUNK_ELEMS // v)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, n, rows):
        xs = x[s : s + rows].detach().double()
        ts = t[s : s + rows]
        total += (torch.logsumexp(xs, dim=1) - xs.gather(1, ts[:, None]).squeeze(1)).sum()
    return float(total) / n


def sample_rows(n: int) -> torch.Tensor:
    """Row indices of the gradient subsample: up to GRAD_SAMPLE_ROWS spread over [0, n)."""
    return torch.linspace(0, n - 1, min(n, GRAD_SAMPLE_ROWS)).round().long().unique()


def reference_grad_rows(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float64 d mean-loss / d logits of the sampled rows: (softmax - onehot) / N."""
    rows = rows.to(x.device)
    xs = x.detach()[rows].double()
    g = torch.softmax(xs, dim=1)
    g[torch.arange(len(rows), device=x.device), t[rows]] -= 1.0
    return g / x.shape[0]


def grad_rel_err(grad: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> float:
    """||grad[rows] - ref|| / ||ref|| (float64)."""
    got = grad.detach()[rows.to(grad.device)].double()
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA or host allocator)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Drops cached allocations between cells."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# One cell
# ------------------------------------------------------------------------------------------


@dataclass
class CellInputs:
    """The cell's pristine logits, targets and the float64 references."""

    x: torch.Tensor
    t: torch.Tensor
    ref_loss: float
    rows: torch.Tensor
    ref_grad: torch.Tensor | None


def make_inputs(cell: Cell, device: torch.device, seed: int) -> CellInputs:
    """Random logits (randn * 3, like the anchors) and targets, and their references."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(cell.n, cell.v, generator=gen, device=device, dtype=DTYPES[cell.dtype])
    x.mul_(3.0)
    t = torch.randint(0, cell.v, (cell.n,), generator=gen, device=device)
    rows = sample_rows(cell.n)
    ref_grad = reference_grad_rows(x, t, rows) if cell.mode == "fwd_bwd" else None
    return CellInputs(x, t, reference_loss(x, t), rows, ref_grad)


def measure_copy(cell: Cell, inp: CellInputs, timing: Timing) -> dict[str, Any]:
    """The floor: copy of the logits into a preallocated buffer (2 N V elem bytes)."""
    device = inp.x.device
    dst = torch.empty_like(inp.x)
    fn = lambda: dst.copy_(inp.x)
    fn()
    _, peak = peak_extra_mib(fn, device)
    ms = time_ms(fn, device, timing)
    copy_bytes = 2 * cell.logits_bytes
    return {"ms": ms, "GBps": copy_bytes / ms / 1e6, "bytes": copy_bytes, "peak_MiB": peak}


def measure_provider(
    name: str, cell: Cell, inp: CellInputs, timing: Timing, copy_gbps: float
) -> dict[str, Any]:
    """Checks one provider against the references, reads its peak memory and times it."""
    device = inp.x.device
    loss_fn = make_loss_fn(name)
    step = make_step(loss_fn, cell.mode)
    destructive = name in DESTRUCTIVE
    x = inp.x.clone() if destructive else inp.x
    x.requires_grad_(cell.mode == "fwd_bwd")
    call = lambda: step(x, inp.t)
    try:
        call()  # warm-up: JIT / torch.compile compilation stays out of everything below
        if destructive:
            with torch.no_grad():
                x.copy_(inp.x)
        (loss, grad), peak = peak_extra_mib(call, device)
        loss_value = float(loss.detach().float())
        result: dict[str, Any] = {
            "loss": loss_value,
            "loss_err": abs(loss_value - inp.ref_loss),
            "loss_rel_err": abs(loss_value - inp.ref_loss) / max(abs(inp.ref_loss), 1e-30),
            "grad_rel_err": None,
            "peak_MiB": peak,
        }
        if grad is not None and inp.ref_grad is not None:
            result["grad_rel_err"] = grad_rel_err(grad, inp.ref_grad, inp.rows)
        del loss, grad
        ms = time_ms(call, device, timing)
        gbps = cell.floor_bytes / ms / 1e6
        result.update(ms=ms, GBps=gbps, pct_copy=100.0 * gbps / copy_gbps)
        if device.type == "cuda" and ms < HOST_TIMING_BELOW_MS:
            result["host_ms"] = host_ms_per_call(call, device, per_batch_ms=10.0)
        if name.startswith("fusedce"):
            result["backend"] = "triton" if fce.uses_triton(inp.x) else "torch fallback"
        result["status"] = "ok"
        return result
    finally:
        x.requires_grad_(False)


def add_speedups(providers: dict[str, dict[str, Any]]) -> None:
    """For each fusedce variant: rival_ms / its ms (above 1: fusedce is faster)."""
    for name, res in providers.items():
        if not name.startswith("fusedce") or res.get("status") != "ok":
            continue
        res["speedup"] = {
            rival: providers[rival]["ms"] / res["ms"]
            for rival in RIVALS
            if providers.get(rival, {}).get("status") == "ok"
        }


def run_cell(
    cell: Cell, providers: list[str], device: torch.device, timing: Timing, seed: int
) -> dict[str, Any]:
    """Runs every provider on one cell; OOM or errors are recorded per provider."""
    rec: dict[str, Any] = {
        "mode": cell.mode,
        "dtype": cell.dtype,
        "N": cell.n,
        "V": cell.v,
        "kind": cell.kind,
        "floor_bytes": cell.floor_bytes,
        "providers": {},
    }
    inp = None
    try:
        inp = make_inputs(cell, device, seed)
        rec["ref_loss"] = inp.ref_loss
        rec["copy"] = measure_copy(cell, inp, timing)
        for name in providers:
            check_stop()
            if name == "fusedce_inplace" and cell.mode == "fwd":
                continue  # identical to fusedce without a gradient
            try:
                rec["providers"][name] = measure_provider(
                    name, cell, inp, timing, rec["copy"]["GBps"]
                )
            except Exception as exc:  # one provider failing must not stop the sweep
                rec["providers"][name] = {"status": _error_text(exc)}
            free_memory(device)
        add_speedups(rec["providers"])
        rec["status"] = "ok"
    except Exception as exc:
        rec["status"] = _error_text(exc)
    finally:
        del inp
        free_memory(device)
    return rec


def _error_text(exc: BaseException) -> str:
    if is_oom(exc):
        return "OOM"
    text = f"error: {type(exc).__name__}: {exc}"
    return text.splitlines()[0][:300]


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Card, versions, date, commit and how the numbers were taken."""
    return {
        **base_environment(device, args.card_name),
        "liger_kernel": liger_version(),
        "timing": (
            f"triton.testing.do_bench median (warmup {args.warmup_ms} ms, rep {args.rep_ms} ms)"
            if device.type == "cuda"
            else "time.perf_counter median per call (CPU fallback path)"
        ),
        "inputs": "logits randn * 3, targets uniform class indices, reduction mean",
        "pct_copy": "achieved GB/s (floor bytes) / copy GB/s (read + write of the logits)",
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return format(value, spec)
    return str(value)


def _sorted_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"fwd_bwd": 0, "fwd": 1}
    return sorted(cells, key=lambda c: (order[c["mode"]], c["dtype"], c["V"], c["N"]))


def summary_table(cells: list[dict[str, Any]]) -> list[str]:
    """One row per cell: the floor, fusedce and its speed-up over each rival."""
    head = (
        "| mode | dtype | N | V | logits MB | copy ms | fusedce ms | % of copy | x eager "
        "| x compile | x liger | inplace ms | nocheck ms | loss err |"
    )
    lines = [head, "|" + "---|" * 14]
    for c in _sorted_cells(cells):
        if c.get("status") != "ok":
            lines.append(f"| {c['mode']} | {c['dtype']} | {c['N']} | {c['V']} | {c['status']} |")
            continue
        p = c["providers"]
        f = p.get("fusedce", {})
        sp = f.get("speedup", {})
        mb = c["floor_bytes"] / (2 if c["mode"] == "fwd_bwd" else 1) / 1e6
        lines.append(
            f"| {c['mode']} | {c['dtype']} | {c['N']} | {c['V']} | {mb:.1f} "
            f"| {_fmt(c['copy']['ms'], '.4f')} | {_fmt(f.get('ms'), '.4f')} "
            f"| {_fmt(f.get('pct_copy'), '.1f')} | {_fmt(sp.get('eager'), '.2f')} "
            f"| {_fmt(sp.get('compile'), '.2f')} | {_fmt(sp.get('liger'), '.2f')} "
            f"| {_fmt(p.get('fusedce_inplace', {}).get('ms'), '.4f')} "
            f"| {_fmt(p.get('fusedce_nocheck', {}).get('ms'), '.4f')} "
            f"| {_fmt(f.get('loss_err'), '.1e')} |"
        )
    return lines


def detail_table(cells: list[dict[str, Any]]) -> list[str]:
    """One row per (cell, provider), the copy floor first."""
    head = (
        "| mode | dtype | N | V | provider | ms | GB/s | % of copy | peak extra MiB "
        "| host ms/call | loss err | grad rel err | status |"
    )
    lines = [head, "|" + "---|" * 13]
    for c in _sorted_cells(cells):
        if c.get("status") != "ok":
            continue
        key = f"| {c['mode']} | {c['dtype']} | {c['N']} | {c['V']}"
        cp = c["copy"]
        lines.append(
            f"{key} | copy (floor) | {_fmt(cp['ms'], '.4f')} | {_fmt(cp['GBps'], '.1f')} "
            f"| 100.0 | {_fmt(cp['peak_MiB'], '.1f')} | n/a | n/a | n/a | ok |"
        )
        for name, r in c["providers"].items():
            if r.get("status") != "ok":
                lines.append(f"{key} | {name} | | | | | | | | {r.get('status')} |")
                continue
            lines.append(
                f"{key} | {name} | {_fmt(r['ms'], '.4f')} | {_fmt(r['GBps'], '.1f')} "
                f"| {_fmt(r['pct_copy'], '.1f')} | {_fmt(r['peak_MiB'], '.1f')} "
                f"| {_fmt(r.get('host_ms'), '.4f')} | {_fmt(r['loss_err'], '.1e')} "
                f"| {_fmt(r['grad_rel_err'], '.1e')} | ok |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown."""
    env = report["env"]
    lines = [
        f"# Cross-entropy benchmark: {env['card']}, {env['date'][:10]}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, liger_kernel {env['liger_kernel']}, "
        f"python {env['python']}, commit {env['git_commit']}. Timing: {env['timing']}.",
        f"Inputs: {env['inputs']}. % of copy: {env['pct_copy']}.",
        "",
    ]
    if not env["device"].startswith("cuda"):
        lines += [
            "**CPU run: these numbers show that the benchmark's plumbing works (the torch",
            "fallback path on a CPU), not GPU speed. Peak memory is n/a on CPU.**",
            "",
        ]
    lines += [f"- {note}" for note in report["notes"]]
    lines += [
        "",
        f"Cells run: {len(report['cells'])}, skipped: {len(report['skipped'])}, "
        f"elapsed {report['elapsed_s']:.1f} s.",
        "",
        "## Summary",
        "",
        "x rival = rival ms / fusedce ms (above 1: fusedce is faster). inplace / nocheck: fusedce",
        "with inplace_backward=True / with the target range check (a host sync) switched off.",
        "",
        *summary_table(report["cells"]),
        "",
        "## Every provider",
        "",
        "peak extra MiB: torch.cuda.max_memory_allocated during one step minus the memory",
        "allocated before it (the gradient included). host ms/call: wall time per call of",
        "back-to-back calls (only where the device time is under 1 ms). loss err: |loss - float64",
        "reference| over all rows; grad rel err: ||g - g_ref|| / ||g_ref|| over up to 64 rows.",
        "",
        *detail_table(report["cells"]),
        "",
    ]
    if report["skipped"]:
        lines += ["## Skipped", ""]
        lines += [f"- {s['cell']}: {s['reason']}" for s in report["skipped"]]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """GB/s against V per provider, one panel per (dtype, mode); the copy rate dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"] if c.get("status") == "ok" and c["kind"] != "latency"]
    rank = {"bf16": 0, "fp32": 1, "fwd_bwd": 0, "fwd": 1}
    panels = sorted(
        {(c["dtype"], c["mode"]) for c in cells}, key=lambda p: (rank[p[0]], rank[p[1]])
    )
    panels = panels or [("bf16", "fwd_bwd")]
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (dtype, mode) in zip(axes.flat, panels, strict=False):
        mine = [c for c in cells if c["dtype"] == dtype and c["mode"] == mode]
        group = sorted((c for c in mine if c["kind"] != "anchor"), key=lambda c: c["V"])
        if not group:  # only anchor cells: plot those
            group = sorted(mine, key=lambda c: c["V"])
        vs = [c["V"] for c in group]
        ax.plot(vs, [c["copy"]["GBps"] for c in group], "k--", label="copy (floor)")
        names = sorted({n for c in group for n in c["providers"]})
        for name in names:
            pts = [
                (c["V"], c["providers"][name]["GBps"])
                for c in group
                if c["providers"].get(name, {}).get("status") == "ok"
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("V (classes)")
        ax.set_ylabel("GB/s over the floor bytes")
        ax.set_title(f"{dtype}, {mode}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"Cross-entropy, {report['env']['card']}, {report['env']['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, stem: str, with_plot: bool) -> list[Path]:
    """Writes <stem>.json and <stem>.md (and <stem>.png when asked); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(report))
    if with_plot:
        try:
            plot(report, out / f"{stem}.png")
            paths.append(out / f"{stem}.png")
        except Exception as exc:  # a broken plot must not lose the numbers
            print(f"plot failed: {exc!r}", flush=True)
    return paths


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """Skips the remaining cells when the next one would likely overrun ``max_seconds``."""

    max_seconds: float | None
    start: float = field(default_factory=time.perf_counter)
    durations: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    def allows_next(self) -> bool:
        """Whether the next cell (estimated as the median cell so far) fits."""
        if self.max_seconds is None:
            return True
        guess = statistics.median(self.durations) if self.durations else 0.0
        return self.elapsed() + guess <= self.max_seconds


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in _csv(text):
        n, v = item.lower().split("x")
        out.append((int(n), int(v)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cross_entropy", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny sweep (CPU-sized, seconds)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--stem", help="output file name without suffix (default <card>-<date>)")
    p.add_argument(
        "--providers",
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma-separated, from {', '.join(ALL_PROVIDERS)}",
    )
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    p.add_argument("--modes", default="fwd_bwd,fwd", help="comma-separated: fwd_bwd, fwd")
    p.add_argument("--shapes", help="shapes instead of the sweep, e.g. 8192x128256,16x32000")
    p.add_argument("--max-seconds", type=float, help="time budget: skip cells that would not fit")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--card-name", help="name of the machine in the outputs")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (CUDA)")
    p.add_argument("--cpu-budget-s", type=float, help="seconds of timed calls per provider (CPU)")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="torch threads on CPU (default 1: on a busy machine, a parallel op waits for its "
        "slowest thread, which adds scheduler quanta of ~10 ms to calls)",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for d in _csv(args.dtypes):
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    for m in _csv(args.modes):
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    return args


_STOP: list[str] = []  # set by the SIGTERM handler, checked between providers and cells


def _on_sigterm(signum: int, frame: Any) -> None:
    _STOP.append(f"signal {signum}")
    raise BudgetExceeded(f"signal {signum}")


def check_stop() -> None:
    """Raises BudgetExceeded if a SIGTERM came (in case library code swallowed the first raise)."""
    if _STOP:
        raise BudgetExceeded(_STOP[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the sweep and writes the outputs; returns the report."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    budget = Budget(args.max_seconds)
    if not on_cuda and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    providers, notes = available_providers(_csv(args.providers), on_cuda)
    notes = list(args.note) + notes
    if on_cuda:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    quick_budget = 0.05 if args.quick else 0.3
    timing = Timing(args.warmup_ms, args.rep_ms, args.cpu_budget_s or quick_budget)
    cells = build_sweep(
        on_cuda,
        args.quick,
        _csv(args.dtypes),
        _csv(args.modes),
        _shapes(args.shapes) if args.shapes else None,
    )
    env = environment(device, args)
    stem = args.stem or f"{slug(env['card'])}-{env['date'][:10]}"
    report: dict[str, Any] = {
        "env": env,
        "providers": providers,
        "notes": notes,
        "cells": [],
        "skipped": [],
        "elapsed_s": 0.0,
    }
    print(f"{env['card']}: {len(cells)} cells, providers {', '.join(providers)}", flush=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for i, cell in enumerate(cells):
            check_stop()
            if not budget.allows_next():
                report["skipped"] += [
                    {"cell": c.label(), "reason": f"time budget of {args.max_seconds:.0f} s"}
                    for c in cells[i:]
                ]
                print(f"budget: skipping the last {len(cells) - i} cells", flush=True)
                break
            t0 = time.perf_counter()
            rec = run_cell(cell, providers, device, timing, args.seed)
            budget.durations.append(time.perf_counter() - t0)
            report["cells"].append(rec)
            report["elapsed_s"] = budget.elapsed()
            print(_progress_line(i, len(cells), cell, rec, budget), flush=True)
            write_outputs(report, args.out, stem, with_plot=False)
    except (BudgetExceeded, KeyboardInterrupt) as exc:
        done = len(report["cells"])
        report["skipped"] += [
            {"cell": c.label(), "reason": f"run stopped ({exc!r})"} for c in cells[done:]
        ]
    finally:
        signal.signal(signal.SIGTERM, previous)
        report["elapsed_s"] = budget.elapsed()
        paths = write_outputs(report, args.out, stem, with_plot=True)
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return report


def _progress_line(i: int, total: int, cell: Cell, rec: dict[str, Any], budget: Budget) -> str:
    parts = [f"[{i + 1}/{total} {budget.elapsed():6.1f}s] {cell.label()}"]
    if rec.get("status") != "ok":
        return parts[0] + f" {rec.get('status')}"
    parts.append(f"copy {rec['copy']['ms']:.4f}")
    for name, r in rec["providers"].items():
        ok = r.get("status") == "ok"
        parts.append(f"{name} {r['ms']:.4f}" if ok else f"{name} {r['status']}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the benchmark and prints the summary table."""
    args = parse_args(argv)
    report = run(args)
    print("\n".join(summary_table(report["cells"])))
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} cells: {report['skipped'][0]['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
