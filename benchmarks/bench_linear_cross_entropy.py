"""Linear + cross-entropy benchmark: fusedce's chunked path against eager, torch, Liger and CCE.

Run as ``python -m benchmarks.bench_linear_cross_entropy`` (``--help`` for the options). One
shape (N tokens, hidden D, vocabulary V, dtype); every provider runs forward + backward of
``cross_entropy(input @ W.T, target)`` with gradients for the input and W:

* time: CUDA ``triton.testing.do_bench`` median; CPU median of ``time.perf_counter`` repeats,
  taken round-robin over the providers (a shared machine's load hits all of them alike);
* peak memory above the inputs: CUDA ``torch.cuda.max_memory_allocated`` around one step (it
  includes the gradients); CPU the peak-RSS rise over one step in a fresh subprocess (Linux's
  resettable VmHWM), which includes the gradients and every temporary;
* error vs float64 on a small shape (loss, and relative norm of both gradients).

Providers: ``fusedce`` (default chunk), ``fusedce_lowmem`` (half the default chunk, at most 128
MiB of logits, and weight-gradient accumulation in the weight's dtype: the memory-saving
setting), ``fusedce_input_acc`` (the default chunk, accumulation in the weight's dtype),
``fusedce_bigchunk`` (1 GiB chunks), ``fusedce_extras`` (the default chunk with
``softcap=30.0, z_loss=1e-4, return_stats=True``: the one-pass extras' cost against
``fusedce``; its errors are against the float64 reference of its own loss),
``fusedce_logprobs`` (``linear_token_log_probs`` with the entropy, both outputs given per-token
upstream gradients by a GRPO-like objective, ``logprob_objective``: RL's use of the head against
the fused cross-entropy at the same shape; its errors against that objective in float64),
``fusedce_none`` (``linear_cross_entropy`` with ``reduction="none"`` and the same per-token
weights: like ``fusedce_logprobs``, its backward recomputes the chunks),
``eager`` (logits
in the input dtype), ``eager_fp32`` (logits upcast to float32 before the loss),
``torch_chunked`` (torch's ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``,
where the installed torch has it), ``liger`` and ``cce`` (Liger's fused linear CE, Apple's
cut-cross-entropy: only if importable, CUDA only).

Outputs in ``--out`` (default ``benchmarks/results``): ``<stem>.md`` (table), ``<stem>.json``
(with the card, torch/triton versions and date) and ``<stem>.png``; the default stem is
``<card>-lce-<date>`` (``cpu-lce-<date>`` on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import fusedce
from benchmarks.common import base_environment, csv, fmt, pick_device, pyplot, slug, write_json
from benchmarks.measure import (
    cpu_interleaved_ms,
    cuda_median_ms,
    free_memory,
    frozen_survivors,
    is_oom,
    peak_extra_mib,
    rss_rise_mib,
    run_json_child,
)
from fusedce.linear_chunks import planned_chunk_rows

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
ALL_PROVIDERS = (
    "fusedce",
    "fusedce_lowmem",
    "fusedce_input_acc",
    "fusedce_bigchunk",
    "fusedce_extras",
    "fusedce_logprobs",
    "fusedce_none",
    "eager",
    "eager_fp32",
    "torch_chunked",
    "liger",
    "cce",
)
# The memory-saving setting: logits chunks of at most this many bytes (plus no float32 buffer).
LOWMEM_CHUNK_BYTES = 1 << 27
# fusedce_bigchunk: 1 GiB chunks, so that the float32 weight-gradient accumulator (read and
# written once per chunk: 2 * V * D * 4 bytes) is swept a quarter as often as by the default.
BIG_CHUNK_BYTES = 1 << 30
ERROR_SHAPE = (512, 128, 4096)  # (N, D, V) of the accuracy check
# fusedce_extras: a softcapped (Gemma-style) head with PaLM's z-loss, stats returned.
EXTRAS_SOFTCAP = 30.0
EXTRAS_Z_LOSS = 1e-4

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# fusedce_logprobs: the entropy bonus of a GRPO-like objective.
ENTROPY_COEF = 0.01


def logprob_objective(logp: torch.Tensor, entropy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """-mean(advantage * logp) - ENTROPY_COEF * mean(entropy): a different upstream gradient
    per token for both outputs (the advantage, in {-1, 0, 1}, from the token id)."""
    advantage = (t % 3 - 1).to(logp.dtype)
    return -(advantage * logp).mean() - ENTROPY_COEF * entropy.mean()


# --------------------------------------------------------------------------------------------
# Providers: each returns the loss of (x (N, D), W (V, D), t (N,)); the caller runs backward.
# --------------------------------------------------------------------------------------------


def _lowmem_chunk(n: int, v: int, dtype: torch.dtype, device: torch.device) -> int:
    """Half the default chunk (GPU: 128 MiB of logits), never more than LOWMEM_CHUNK_BYTES."""
    cap = LOWMEM_CHUNK_BYTES // (v * torch.empty((), dtype=dtype).element_size())
    return max(1, min(planned_chunk_rows(n, v, dtype, None, device) // 2, cap))


def make_provider(name: str, device: torch.device) -> Step | None:
    """The loss function of a provider, or None where it is unavailable here."""
    if name == "fusedce":
        return lambda x, W, t: fusedce.linear_cross_entropy(x, W, t)
    if name == "fusedce_lowmem":
        return lambda x, W, t: fusedce.linear_cross_entropy(
            x,
            W,
            t,
            chunk_size=_lowmem_chunk(*x.shape[:1], *W.shape[:1], W.dtype, device),
            accumulation="input",
        )
    if name == "fusedce_input_acc":  # the default chunk, weight gradient summed in its dtype
        return lambda x, W, t: fusedce.linear_cross_entropy(x, W, t, accumulation="input")
    if name == "fusedce_bigchunk":
        return lambda x, W, t: fusedce.linear_cross_entropy(
            x, W, t, chunk_size=max(1, BIG_CHUNK_BYTES // (W.shape[0] * W.element_size()))
        )
    if name == "fusedce_extras":
        return lambda x, W, t: fusedce.linear_cross_entropy(
            x, W, t, softcap=EXTRAS_SOFTCAP, z_loss=EXTRAS_Z_LOSS, return_stats=True
        )[0]  # the stats are computed, not used
    if name == "fusedce_logprobs":
        return lambda x, W, t: logprob_objective(*fusedce.linear_token_log_probs(x, W, t), t)
    if name == "fusedce_none":  # the per-token weights of logprob_objective, on the loss
        return lambda x, W, t: (
            (t % 3 - 1).float() * fusedce.linear_cross_entropy(x, W, t, reduction="none")
        ).mean()
    if name == "eager":
        return lambda x, W, t: F.cross_entropy(F.linear(x, W), t)
    if name == "eager_fp32":
        return lambda x, W, t: F.cross_entropy(F.linear(x, W).float(), t)
    if name == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(
            torch.nn, "LinearCrossEntropyOptions"
        ):
            return None
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda x, W, t: F.linear_cross_entropy(x, W, t, options=opts)
    if device.type != "cuda":
        return None
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda x, W, t: liger(W, x, t)
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            return None
        return lambda x, W, t: cce(x, W, t)
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x (n, d), W (v, d) with O(1) logits, t (n,): leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    W = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return x, W.requires_grad_(), t


def run_step(fn: Step, x: torch.Tensor, W: torch.Tensor, t: torch.Tensor) -> None:
    """Forward + backward of one provider; the gradients land in x.grad and W.grad."""
    x.grad = W.grad = None
    fn(x, W, t).backward()


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def cuda_peak_mib(fn: Step, x: torch.Tensor, W: torch.Tensor, t: torch.Tensor) -> float:
    """Peak CUDA memory (MiB) of one step above the inputs (the gradients included)."""
    x.grad = W.grad = None
    free_memory(x.device)
    _, peak = peak_extra_mib(lambda: run_step(fn, x, W, t), x.device)
    return peak


def cpu_peak_mib(name: str, n: int, d: int, v: int, dtype_name: str) -> dict[str, float] | None:
    """Peak-RSS rise of one step in a fresh process (providers share no high-water mark)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_linear_cross_entropy", "--rss-child", name]
    cmd += ["--n", str(n), "--d", str(d), "--v", str(v), "--dtype", dtype_name]
    return run_json_child(cmd)


def rss_child(args: argparse.Namespace) -> None:
    """One step; prints its peak RSS above the RSS with the inputs built (the --rss-child mode).

    A warm-up step on 128 rows of the same D and V comes first, so that one-time costs
    (Inductor's compile of the CPU rows, oneDNN's lazy setup) are not counted as the step's.
    """
    device = torch.device("cpu")
    fn = make_provider(args.rss_child, device)
    run_step(fn, *make_inputs(min(args.n, 128), args.d, args.v, DTYPES[args.dtype], device))
    x, W, t = make_inputs(args.n, args.d, args.v, DTYPES[args.dtype], device)
    _, rss = rss_rise_mib(lambda: run_step(fn, x, W, t))
    print(json.dumps(rss))


def reference_loss(name: str, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The float64 loss a provider computes, from the logits (N, V): plain cross-entropy, for
    ``fusedce_extras`` the softcapped one plus the mean z-loss, for ``fusedce_logprobs`` the
    ``logprob_objective`` of the log-probabilities and entropies."""
    if name == "fusedce_none":
        return ((t % 3 - 1).double() * F.cross_entropy(logits, t, reduction="none")).mean()
    if name == "fusedce_logprobs":
        log_q = torch.log_softmax(logits, dim=1)
        entropy = -(log_q.exp() * log_q).sum(1)
        return logprob_objective(log_q.gather(1, t[:, None])[:, 0], entropy, t)
    if name != "fusedce_extras":
        return F.cross_entropy(logits, t)
    z = EXTRAS_SOFTCAP * torch.tanh(logits / EXTRAS_SOFTCAP)
    return F.cross_entropy(z, t) + EXTRAS_Z_LOSS * torch.logsumexp(z, dim=1).square().mean()


def errors_vs_float64(
    fn: Step, dtype: torch.dtype, device: torch.device, name: str = "fusedce"
) -> dict[str, float]:
    """Loss error and gradient relative-norm errors vs float64 on ERROR_SHAPE (``name``: the
    provider, whose own loss is the reference)."""
    n, d, v = ERROR_SHAPE
    x, W, t = make_inputs(n, d, v, dtype, device, seed=1)
    loss = fn(x, W, t)
    gx, gw = torch.autograd.grad(loss, (x, W))
    x64, W64 = (a.detach().double().requires_grad_() for a in (x, W))
    ref = reference_loss(name, F.linear(x64, W64), t)
    rx, rw = torch.autograd.grad(ref, (x64, W64))
    rel = lambda a, r: float((a.double() - r).norm() / r.norm())
    return {
        "loss_abs_err": abs(float(loss.detach()) - float(ref.detach())),
        "grad_input_rel_err": rel(gx, rx),
        "grad_weight_rel_err": rel(gw, rw),
    }


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Errors and peak memory of one provider (timing is done round-robin in ``time_all``)."""
    fn = make_provider(name, device)
    if fn is None:
        return {"provider": name, "status": "unavailable"}
    dtype = DTYPES[args.dtype]
    row: dict[str, Any] = {"provider": name, "status": "ok"}
    try:
        row.update(errors_vs_float64(fn, dtype, device, name))
        if device.type == "cuda":
            x, W, t = make_inputs(args.n, args.d, args.v, dtype, device)
            row["peak_mib"] = cuda_peak_mib(fn, x, W, t)
            del x, W, t
        elif not args.no_memory:
            rss = cpu_peak_mib(name, args.n, args.d, args.v, args.dtype)
            if rss is not None:
                row["peak_mib"] = rss["rss_delta_mib"]
                row["max_rss_mib"] = rss["max_rss_mib"]
    except Exception as exc:
        if not is_oom(exc):
            raise
        row["status"] = "out of memory"
    free_memory(device)
    return row


def time_all(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> None:
    """Times every available provider. CUDA: do_bench each. CPU: round-robin repeats, so that
    load from other processes on a shared machine spreads evenly over the providers."""
    live = [r for r in rows if r["status"] == "ok"]
    x, W, t = make_inputs(args.n, args.d, args.v, DTYPES[args.dtype], device)
    fns = {r["provider"]: make_provider(r["provider"], device) for r in live}
    steps = {name: (lambda fn=fn: run_step(fn, x, W, t)) for name, fn in fns.items()}
    if device.type == "cuda":
        for r in live:
            try:
                r["time_ms"] = cuda_median_ms(
                    steps[r["provider"]], rep_ms=200 * args.repeats, grad_to_none=[x, W]
                )
            except Exception as exc:
                if not is_oom(exc):
                    raise
                r["status"] = "out of memory"
            free_memory(device)
        return
    samples = cpu_interleaved_ms(steps, args.repeats)
    for r in live:
        r["time_ms"] = statistics.median(samples[r["provider"]])
        r["time_samples_ms"] = samples[r["provider"]]


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Card, versions, date, commit, the measured shape and how memory was taken."""
    return {
        **base_environment(device, args.card_name),
        "shape": {"n": args.n, "d": args.d, "v": args.v, "dtype": args.dtype},
        "error_shape": dict(zip(("n", "d", "v"), ERROR_SHAPE, strict=True)),
        "default_chunk_rows": planned_chunk_rows(args.n, args.v, DTYPES[args.dtype], None, device),
        "lowmem_chunk_rows": _lowmem_chunk(args.n, args.v, DTYPES[args.dtype], device),
        "memory_metric": (
            "torch.cuda.max_memory_allocated above the inputs (gradients included)"
            if device.type == "cuda"
            else "peak-RSS rise of one step in a fresh process after a 128-row warm-up step "
            "(gradients included)"
        ),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the set-up and one table row per provider."""
    env = report["environment"]
    s = env["shape"]
    lines = [
        f"# Linear + cross-entropy, N={s['n']} D={s['d']} V={s['v']} {s['dtype']}",
        "",
        f"{env['card']}; torch {env['torch']}, triton {env['triton']}; {env['date']}.",
        f"Forward + backward (gradients for input and weight). Memory: {env['memory_metric']}.",
        f"Errors vs float64 on N,D,V = {tuple(env['error_shape'].values())}. fusedce chunk rows: "
        f"{env['default_chunk_rows']} (default), {env['lowmem_chunk_rows']} (lowmem).",
        "",
        "| provider | time (ms) | peak (MiB) | loss err | grad input err | grad weight err |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r['status']} | | | | |")
            continue
        lines.append(
            f"| {r['provider']} | {fmt(r.get('time_ms'), '.1f')} | "
            f"{fmt(r.get('peak_mib'), '.0f')} | {fmt(r.get('loss_abs_err'), '.2e')} | "
            f"{fmt(r.get('grad_input_rel_err'), '.2e')} | "
            f"{fmt(r.get('grad_weight_rel_err'), '.2e')} |"
        )
    times = {r["provider"]: r.get("time_ms") for r in report["results"] if r["status"] == "ok"}
    if times.get("fusedce_logprobs"):
        # The RL head's budget is stated against the fused cross-entropy at the same shape;
        # fusedce_none recomputes its chunks in backward as the RL head does.
        ratios = [
            f"fusedce_logprobs / {base} time: {times['fusedce_logprobs'] / times[base]:.2f}x"
            for base in ("fusedce", "fusedce_none")
            if times.get(base)
        ]
        lines += ["", *(f"- {r}" for r in ratios)] if ratios else []
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Time and peak memory per provider, as two bar charts."""
    plt = pyplot()
    rows = [r for r in report["results"] if r["status"] == "ok"]
    names = [r["provider"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "time_ms", "time (ms)"), (axes[1], "peak_mib", "peak MiB")):
        values = [r.get(key) or 0.0 for r in rows]
        ax.barh(names, values, color="tab:blue")
        ax.set_xlabel(label)
        ax.invert_yaxis()
    s = report["environment"]["shape"]
    fig.suptitle(
        f"linear + CE fwd+bwd, N={s['n']} D={s['d']} V={s['v']} {s['dtype']} "
        f"({report['environment']['card']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Writes <stem>.md, <stem>.json and <stem>.png into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"]
    paths[0].write_text(markdown(report))
    write_json(paths[1], report, indent=2)
    plot(report, paths[2])
    return paths


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192, help="tokens (rows)")
    p.add_argument("--d", type=int, default=4096, help="hidden size")
    p.add_argument("--v", type=int, default=128256, help="vocabulary size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--stem", help="output file name without suffix")
    p.add_argument("--quick", action="store_true", help="one timed repeat (smoke run)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (CPU)")
    p.add_argument("--providers", default=",".join(ALL_PROVIDERS), help="comma-separated")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--card-name", help="name of the machine in the outputs")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the RSS subprocesses")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: measures every provider, writes the outputs, prints the table."""
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return 0
    device = pick_device(args.device)
    results = []
    with frozen_survivors():
        for name in csv(args.providers):
            results.append(measure(name, args, device))
            print(json.dumps(results[-1]), flush=True)
        time_all(results, args, device)
    report = {"environment": environment(device, args), "results": results}
    date = report["environment"]["date"][:10]
    stem = args.stem or f"{slug(report['environment']['card'])}-lce-{date}"
    for path in write_outputs(report, args.out, stem):
        print(f"wrote {path}")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
