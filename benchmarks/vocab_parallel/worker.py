"""The ranks of the vocabulary-parallel benchmark: the three paths to the loss from one rank's
slice of the logits (`split_widths`: the slices), one (N, V) cell counted and timed on every
rank, and `run_world`, which spawns the ranks and collects their records."""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedce
from benchmarks.vocab_parallel.counting import (
    CollectiveCounter,
    profiler_log_filtered,
    profiler_numels,
)
from fusedce.index_check import target_check_enabled
from fusedce.vocab_parallel import vocab_parallel_cross_entropy

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


def split_widths(vocab: int, world: int) -> list[int]:
    """V split over the ranks as evenly as it goes (the first ranks get one class more)."""
    base, extra = divmod(vocab, world)
    return [base + (r < extra) for r in range(world)]


def _path_functions(
    rank: int, world: int, vocab: int, local: torch.Tensor, target: torch.Tensor, pg: Any
) -> dict[str, Callable[[], torch.Tensor]]:
    """The three ways to the loss from this rank's (N, V_r) slice ``local``."""
    widths = split_widths(vocab, world)
    start, width, wmax = sum(widths[:rank]), widths[rank], max(widths)

    def sharded() -> torch.Tensor:
        return fusedce.cross_entropy(local, target, process_group=pg)

    def sharded_sizes() -> torch.Tensor:
        # The sizes given and the checks off: trusted, no exchange (with the checks on, the same
        # all_gather as the sharded path checks them).
        checking = target_check_enabled()
        fusedce.set_target_check(False)
        try:
            return vocab_parallel_cross_entropy(
                local, target, process_group=pg, vocab_start=start, vocab_size=vocab
            )
        finally:
            fusedce.set_target_check(checking)

    def gather() -> torch.Tensor:
        send = local.detach()
        if width < wmax:  # equal-sized buffers for the collective
            send = torch.nn.functional.pad(send, (0, wmax - width))
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send.contiguous(), group=pg)
        parts = [p[:, : widths[r]] for r, p in enumerate(parts)]
        parts[rank] = local  # this rank's own slice: backward gives its gradient
        return fusedce.cross_entropy(torch.cat(parts, dim=1), target)

    return {"sharded": sharded, "sharded_sizes": sharded_sizes, "gather": gather}


def _run_cell(
    rank: int, world: int, cfg: dict[str, Any], n: int, vocab: int, pg: Any, device: torch.device
) -> dict[str, Any]:
    """One (N, V) on this rank: a counted call per path, then the interleaved timed calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    widths = split_widths(vocab, world)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    local = torch.randn(n, widths[rank], generator=gen) * 3
    local = local.to(device=device, dtype=DTYPES[cfg["dtype"]]).requires_grad_()
    tgen = torch.Generator().manual_seed(cfg["seed"])  # the same target on every rank
    target = torch.randint(0, vocab, (n,), generator=tgen).to(device)
    every = _path_functions(rank, world, vocab, local, target, pg)
    fns = {k: every[k] for k in cfg["paths"]}
    cell: dict[str, Any] = {"n": n, "v": vocab, "widths": widths, "paths": {}}

    # One counted call per path (also the warm-up): the shim and the profiler.
    grads = {}
    for name, fn in fns.items():
        counter = CollectiveCounter(world)
        local.grad = None
        dist.barrier()
        with (
            profiler_log_filtered(),
            torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
            ) as prof,
            counter.active(),
        ):
            counter.phase = "fwd"
            loss = fn()
            counter.phase = "bwd"
            loss.backward()
            sync()
        grads[name] = local.grad.float()
        cell["paths"][name] = {
            "collectives": counter.records,
            "profiler": profiler_numels(prof),
            "loss": float(loss.detach()),
        }
    ref = grads[next(iter(fns))]
    for name, grad in grads.items():
        cell["paths"][name]["grad_max_abs_diff"] = float((grad - ref).abs().max())

    # Timed calls, interleaved, each after a barrier.
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(cfg["warmup"] + cfg["repeats"]):
        for name, fn in fns.items():
            local.grad = None
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            fn().backward()
            sync()
            if rep >= cfg["warmup"]:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    for name in fns:
        cell["paths"][name]["ms_samples"] = samples[name]
    if rank == 0:
        medians = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in samples.items() if v)
        print(f"  W={world} N={n} V={vocab}: ms {medians}", flush=True)
    return cell


def _worker(rank: int, world: int, cfg: dict[str, Any], init_file: str, out_dir: str) -> None:
    """One rank: every cell of the grid; writes ``rank<r>.json`` into ``out_dir``."""
    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    result: dict[str, Any] = {"rank": rank, "cells": [], "error": None}
    kwargs: dict[str, Any] = {}
    if cuda:
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    elif cfg["cpu_threads"] > 0:
        torch.set_num_threads(cfg["cpu_threads"])
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=_dt.timedelta(seconds=cfg["pg_timeout_s"]),
        **kwargs,
    )
    try:
        for n, vocab in cfg["cells"]:
            result["cells"].append(_run_cell(rank, world, cfg, n, vocab, dist.group.WORLD, device))
            if cuda:
                torch.cuda.empty_cache()
    except Exception:
        result["error"] = traceback.format_exc()
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def run_world(world: int, cfg: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Spawns ``world`` ranks over the grid; returns each rank's record (rank order). Raises
    RuntimeError naming the failure when a rank fails or the group outlives ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="fusedce_vp_") as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(world, cfg, str(Path(tmp, "pg_init")), tmp),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{world} ranks did not finish within {timeout_s:.0f} s")
        except Exception as exc:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"the benchmark with {world} ranks failed: {exc}") from exc
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
