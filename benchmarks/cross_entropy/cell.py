"""One cell of the sweep: its inputs and references, the copy floor, and every provider checked
against float64, its peak memory read (CUDA) and timed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.cross_entropy.accuracy import (
    grad_rel_err,
    loss_errors,
    reference_grad_rows,
    reference_loss,
    sample_rows,
)
from benchmarks.cross_entropy.budget import check_stop
from benchmarks.cross_entropy.providers import (
    DESTRUCTIVE,
    EXTRAS,
    RIVALS,
    backend_label,
    make_loss_fn,
    make_step,
    token_weights,
)
from benchmarks.cross_entropy.sweep import DTYPES, Cell
from benchmarks.measure import (
    cpu_median_ms,
    cuda_median_ms,
    free_memory,
    host_ms_per_call,
    is_oom,
    peak_extra_mib,
)

HOST_TIMING_BELOW_MS = 1.0


@dataclass
class Timing:
    """How to time: do_bench windows on CUDA, a per-provider time budget on the CPU."""

    warmup_ms: float = 10.0
    rep_ms: float = 100.0
    cpu_budget_s: float = 0.3
    cpu_min_reps: int = 3

    def median_ms(self, fn: Any, device: torch.device) -> float:
        """Median milliseconds of one call of ``fn`` (already warm)."""
        if device.type == "cuda":
            return cuda_median_ms(fn, self.warmup_ms, self.rep_ms)
        return cpu_median_ms(fn, self.cpu_budget_s, self.cpu_min_reps)


@dataclass
class CellInputs:
    """The cell's pristine logits x (N, V), targets t (N,) and token weights w (N,) (for the
    extras providers), and the plain call's float64 references: the mean loss, the sampled rows
    (k,) and, for fwd_bwd, their gradient (k, V)."""

    x: torch.Tensor
    t: torch.Tensor
    ref_loss: float
    rows: torch.Tensor
    ref_grad: torch.Tensor | None
    w: torch.Tensor

    def references(self, name: str, mode: str) -> tuple[float, torch.Tensor | None]:
        """(mean loss, gradient rows (k, V) or None) in float64 for provider ``name``: the
        plain ones, or computed here for an ``EXTRAS`` provider (its own loss)."""
        if name not in EXTRAS:
            return self.ref_loss, self.ref_grad
        extras = EXTRAS[name]
        loss = reference_loss(self.x, self.t, extras, self.w)
        grad = None
        if mode == "fwd_bwd":
            grad = reference_grad_rows(self.x, self.t, self.rows, extras, self.w)
        return loss, grad


def make_inputs(cell: Cell, device: torch.device, seed: int) -> CellInputs:
    """Random logits (randn * 3, like the anchors) and targets, and their references."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(cell.n, cell.v, generator=gen, device=device, dtype=DTYPES[cell.dtype])
    x.mul_(3.0)
    t = torch.randint(0, cell.v, (cell.n,), generator=gen, device=device)
    rows = sample_rows(cell.n)
    ref_grad = reference_grad_rows(x, t, rows) if cell.mode == "fwd_bwd" else None
    return CellInputs(x, t, reference_loss(x, t), rows, ref_grad, token_weights(t, seed))


def measure_copy(cell: Cell, inp: CellInputs, timing: Timing) -> dict[str, Any]:
    """The floor: copy of the logits into a preallocated buffer (2 N V elem bytes)."""
    device = inp.x.device
    dst = torch.empty_like(inp.x)
    fn = lambda: dst.copy_(inp.x)
    fn()
    _, peak = peak_extra_mib(fn, device)
    ms = timing.median_ms(fn, device)
    copy_bytes = 2 * cell.logits_bytes
    return {"ms": ms, "GBps": copy_bytes / ms / 1e6, "bytes": copy_bytes, "peak_MiB": peak}


def measure_provider(
    name: str, cell: Cell, inp: CellInputs, timing: Timing, copy_gbps: float
) -> dict[str, Any]:
    """Checks one provider against the references, reads its peak memory and times it."""
    device = inp.x.device
    ref_loss, ref_grad = inp.references(name, cell.mode)
    step = make_step(make_loss_fn(name, inp.w), cell.mode)
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
            **loss_errors(loss_value, ref_loss),
            "grad_rel_err": None,
            "peak_MiB": peak,
        }
        if name in EXTRAS:
            result["extras"] = EXTRAS[name].text()
            result["ref_loss"] = ref_loss
        if grad is not None and ref_grad is not None:
            result["grad_rel_err"] = grad_rel_err(grad, ref_grad, inp.rows)
        del loss, grad, ref_grad
        ms = timing.median_ms(call, device)
        gbps = cell.floor_bytes / ms / 1e6
        result.update(ms=ms, GBps=gbps, pct_copy=100.0 * gbps / copy_gbps)
        if device.type == "cuda" and ms < HOST_TIMING_BELOW_MS:
            result["host_ms"] = host_ms_per_call(call, device, per_batch_ms=10.0)
        if (backend := backend_label(name, inp.x)) is not None:
            result["backend"] = backend
        result["status"] = "ok"
        return result
    finally:
        x.requires_grad_(False)


def add_speedups(providers: dict[str, dict[str, Any]]) -> None:
    """For each fusedce variant: rival_ms / its ms (above 1: fusedce is faster); for each
    extras provider also ``vs_plain`` = its ms / the plain fusedce ms (the extras' cost)."""
    plain = providers.get("fusedce", {})
    for name, res in providers.items():
        if not name.startswith("fusedce") or res.get("status") != "ok":
            continue
        res["speedup"] = {
            rival: providers[rival]["ms"] / res["ms"]
            for rival in RIVALS
            if providers.get(rival, {}).get("status") == "ok"
        }
        if name in EXTRAS and plain.get("status") == "ok":
            res["vs_plain"] = res["ms"] / plain["ms"]


def error_text(exc: BaseException) -> str:
    """ "OOM", or the first line of the error (at most 300 characters), for the report."""
    if is_oom(exc):
        return "OOM"
    text = f"error: {type(exc).__name__}: {exc}"
    return text.splitlines()[0][:300]


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
                rec["providers"][name] = {"status": error_text(exc)}
            free_memory(device)
        add_speedups(rec["providers"])
        rec["status"] = "ok"
    except Exception as exc:
        rec["status"] = error_text(exc)
    finally:
        del inp
        free_memory(device)
    return rec
