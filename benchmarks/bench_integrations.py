"""Hugging Face integration benchmark: peak memory and step time of a causal LM training step
with ``fusedce.integrations.transformers.apply(model)`` against the unpatched model.

Run as ``python -m benchmarks.bench_integrations`` (``--help`` for the options). The model is a
random-init ``LlamaForCausalLM`` with a large vocabulary and a tiny body (default V = 128256, the
Llama 3 vocabulary; hidden 64, 2 layers; batch 4 x 256 tokens; float32), where the output head's
(B, T, V) logits dominate the memory of a step. Each variant runs in a fresh process:

* build the model (same seed: same weights) and AdamW, one warm-up step (gradients and optimizer
  state exist from then on, as in training);
* memory of the next step (``zero_grad(set_to_none=True)``, forward with ``labels``, backward,
  ``optimizer.step()``): on the CPU the peak-RSS rise over the step (Linux's resettable VmHWM;
  the child runs with ``MALLOC_MMAP_THRESHOLD_`` set so that freed blocks go back to the system
  and the RSS before the step is the live memory); on CUDA ``torch.cuda.max_memory_allocated``
  above the memory allocated before the step;
* time: the median of ``--repeats`` further steps.

Outputs in ``--out`` (default a fresh ``runs/benchmarks/<date>-<time>/``): ``<stem>.md`` and
``<stem>.json`` (card, versions, date, commit, the model's shape), default stem
``<card>-integrations-<date>``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import base_environment, fmt, pick_device, slug, write_json
from benchmarks.measure import (
    free_memory,
    frozen_survivors,
    peak_extra_mib,
    rss_rise_mib,
    run_json_child,
    sync,
)

VARIANTS = ("unpatched", "fusedce")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Allocations of at least this many bytes are mmapped (glibc), so a freed block leaves the RSS:
# without it glibc keeps freed memory up to its dynamic threshold (32 MiB) in the heap.
CHILD_MMAP_THRESHOLD = str(1 << 20)
# --quick: a tiny model, seconds on a CPU (plumbing only).
QUICK = {"vocab": 4096, "hidden": 32, "layers": 1, "batch": 2, "seq": 32, "repeats": 1}


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, dict[str, torch.Tensor]]:
    """The random-init Llama model (seeded: both variants get the same weights) and a batch:
    ``input_ids`` and ``labels`` (B, T), labels = input_ids (transformers shifts inside)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.hidden // 16)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=DTYPES[args.dtype]).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    return model, {"input_ids": ids, "labels": ids}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant, in this (fresh) process: warm-up step, one measured step, timed steps."""
    device = pick_device(args.device)
    if device.type == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    model, batch = build(args, device)
    if args.child == "fusedce":
        import fusedce.integrations.transformers as fused

        fused.apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    first_loss = step()  # warm-up: gradients and the optimizer state now exist
    free_memory(device)
    row: dict[str, Any] = {"variant": args.child, "first_loss": first_loss}
    if device.type == "cuda":
        row["loss"], row["peak_mib"] = peak_extra_mib(step, device)
        row["max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["loss"], rss = rss_rise_mib(step)
        row["peak_mib"] = rss["rss_delta_mib"]
        row["max_rss_mib"] = rss["max_rss_mib"]
    times = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    row["step_ms"] = statistics.median(times)
    row["step_samples_ms"] = times
    return row


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one variant in a fresh process; its row, or a row with the failure as status."""
    cmd = [sys.executable, "-m", "benchmarks.bench_integrations", "--child", name]
    for key in ("vocab", "hidden", "layers", "batch", "seq", "repeats", "seed", "cpu_threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--dtype", args.dtype, "--device", args.device]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": CHILD_MMAP_THRESHOLD}
    row = run_json_child(cmd, timeout_s=args.child_timeout_s, env=env)
    if row is None:
        return {"variant": name, "status": "failed (see the output above)"}
    return {**row, "status": "ok"}


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Card, versions, date, commit, the model's shape and how memory and time were taken."""
    try:  # without importing it: the parent process only starts the children
        tf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf_version = None
    return {
        **base_environment(device, args.card_name),
        "transformers": tf_version,
        "model": {
            "class": "LlamaForCausalLM (random init, untied embeddings)",
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "batch": args.batch,
            "seq": args.seq,
            "dtype": args.dtype,
        },
        "step": "zero_grad(set_to_none=True), forward with labels, backward, AdamW step",
        "memory_metric": (
            "torch.cuda.max_memory_allocated during one step above the memory allocated before it"
            if device.type == "cuda"
            else "peak-RSS rise (VmHWM) over one step, after a warm-up step, in a fresh process "
            f"with MALLOC_MMAP_THRESHOLD_={CHILD_MMAP_THRESHOLD}"
        ),
        "timing": f"median of {args.repeats} steps after the measured one",
        "cpu_threads": args.cpu_threads if device.type == "cpu" else None,
        # A shared machine's load slows the step times (not the memory): recorded with them.
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }


def summarise(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Ratios fusedce / unpatched, the logits' size and the loss difference."""
    by = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    out: dict[str, Any] = {"logits_mib": args.batch * args.seq * args.vocab * elem / 2**20}
    if {"unpatched", "fusedce"} <= by.keys():
        u, f = by["unpatched"], by["fusedce"]
        out["peak_ratio"] = f["peak_mib"] / u["peak_mib"] if u["peak_mib"] else None
        out["peak_saved_mib"] = u["peak_mib"] - f["peak_mib"]
        out["step_time_ratio"] = f["step_ms"] / u["step_ms"]
        out["loss_abs_diff"] = abs(f["loss"] - u["loss"])
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: set-up, one row per variant, the ratios."""
    env, s = report["environment"], report["summary"]
    m = env["model"]
    lines = [
        f"# transformers integration: {env['card']}, {env['date'][:10]}",
        "",
        f"{m['class']}: V={m['vocab']}, hidden {m['hidden']}, {m['layers']} layers, batch "
        f"{m['batch']} x {m['seq']} tokens, {m['dtype']}; logits (B, T, V) would be "
        f"{s['logits_mib']:.0f} MiB. torch {env['torch']}, transformers {env['transformers']}, "
        f"python {env['python']}, commit {env['git_commit']}.",
        "",
        f"Step: {env['step']}. Memory: {env['memory_metric']}. Time: {env['timing']}"
        + (
            f" (load average at the end: {env['load_average'][0]})."
            if env.get("load_average")
            else "."
        ),
        "",
        "| variant | peak rise (MiB) | step (ms) | loss |",
        "|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | |")
            continue
        lines.append(
            f"| {r['variant']} | {fmt(r['peak_mib'], '.0f')} | {fmt(r['step_ms'], '.0f')} "
            f"| {fmt(r['loss'], '.6f')} |"
        )
    if "peak_ratio" in s:
        lines += [
            "",
            f"fusedce / unpatched: peak rise {fmt(s['peak_ratio'], '.3f')}x "
            f"({fmt(s['peak_saved_mib'], '.0f')} MiB less), step time "
            f"{fmt(s['step_time_ratio'], '.2f')}x; |loss difference| "
            f"{fmt(s['loss_abs_diff'], '.1e')}.",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_integrations", description=__doc__.splitlines()[0]
    )
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size V")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's dtype")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument("--quick", action="store_true", help="a tiny model: plumbing only, seconds")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--card-name", help="name of the machine in the outputs")
    p.add_argument("--out", type=Path, help="output folder (default runs/benchmarks/<time>/)")
    p.add_argument("--stem", help="output file name without suffix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-timeout-s", type=float, default=600.0, help="per variant")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in (v.strip() for v in args.variants.split(",") if v.strip()):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    for key in ("vocab", "hidden", "layers", "batch", "seq", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1")
    args.device = args.device or str(pick_device(None))
    if args.out is None:
        args.out = Path("runs/benchmarks") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: each variant in a fresh process, then the outputs and the table."""
    args = parse_args(argv)
    if args.child:
        with frozen_survivors():
            print(json.dumps(child(args)))
        return 0
    device = torch.device(args.device)
    rows = []
    for name in (v.strip() for v in args.variants.split(",") if v.strip()):
        rows.append(run_variant(name, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_samples_ms"}))
    report = {
        "environment": environment(args, device),
        "results": rows,
        "summary": summarise(rows, args),
    }
    stem = args.stem or f"{slug(report['environment']['card'])}-integrations-"
    stem += "" if args.stem else report["environment"]["date"][:10]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", report, indent=2)
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / stem}.md, .json")
    print(markdown(report))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
