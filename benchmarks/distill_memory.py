"""Peak-RSS rise of one CPU forward + backward of the distillation losses on a linear head,
against ``fusedce.linear_cross_entropy`` at the same shape and the logits path.

Providers (each in a fresh process, after a 64-row warm-up call, as ``benchmarks.cpu_memory``):

* ``lce``: ``fusedce.linear_cross_entropy(x, W, target)``, the fused cross-entropy's peak;
* ``sparse``: ``fusedce.linear_distillation_loss`` with the teacher's top-k (ids and
  log-probabilities, N x k each);
* ``dense``: the same with a dense teacher head (teacher_input N x D, teacher_weight V x D);
* ``logits``: ``fusedce.distillation_loss(x @ W.T, teacher_ids=..., ...)``: the (N, V) logits
  and their gradient materialised.

    python -m benchmarks.distill_memory --shape 4096x512x32000 --k 256 \\
        --out benchmarks/results/cpu-distill-memory-2026-12-06.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import fusedce
from benchmarks.common import base_environment
from benchmarks.measure import rss_rise_mib, run_json_child

PROVIDERS = ("lce", "sparse", "dense", "logits")


def _inputs(n: int, d: int, v: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=g) / d**0.5).requires_grad_()
    W = torch.randn(v, d, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    ids = torch.rand(n, v, generator=g).topk(k, dim=1).indices if k else None
    logp = torch.log_softmax(torch.randn(n, k, generator=g), 1) - 0.1 if k else None
    return {"x": x, "W": W, "t": t, "ids": ids, "logp": logp}


def _loss(provider: str, a: dict[str, torch.Tensor], rows: slice, chunk: int | None):
    x, W, t = a["x"][rows], a["W"], a["t"][rows]
    if provider == "lce":
        return fusedce.linear_cross_entropy(x, W, t, chunk_size=chunk)
    if provider == "dense":
        tx, tW = a["tx"][rows], a["tW"]
        return fusedce.linear_distillation_loss(
            x, W, teacher_input=tx, teacher_weight=tW, chunk_size=chunk
        )
    ids, logp = a["ids"][rows], a["logp"][rows]
    if provider == "sparse":
        return fusedce.linear_distillation_loss(
            x, W, teacher_ids=ids, teacher_log_probs=logp, chunk_size=chunk
        )
    return fusedce.distillation_loss(x @ W.t(), teacher_ids=ids, teacher_log_probs=logp)


def child(provider: str, n: int, d: int, v: int, k: int, chunk: int | None) -> dict[str, float]:
    """One measurement in this process (the --child mode)."""
    torch.set_num_threads(1)
    a = _inputs(n, d, v, k)
    if provider == "dense":
        g = torch.Generator().manual_seed(1)
        a["tx"] = torch.randn(n, d, generator=g) / d**0.5
        a["tW"] = torch.randn(v, d, generator=g)
    _loss(provider, a, slice(0, 64), chunk).backward()

    def step() -> None:
        _loss(provider, a, slice(0, n), chunk).backward()

    _, rss = rss_rise_mib(step)
    rss["logits_mib"] = n * v * 4 / 2**20
    return rss


def measure(n: int, d: int, v: int, k: int, chunk: int | None) -> dict[str, dict | None]:
    """Every provider in its own process: {provider: child's result or None}."""
    out = {}
    for prov in PROVIDERS:
        cmd = [sys.executable, "-m", "benchmarks.distill_memory", "--child", prov]
        args = [str(n), str(d), str(v), str(k), str(chunk or 0)]
        out[prov] = run_json_child([*cmd, *args])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096x512x32000", help="NxDxV")
    p.add_argument("--k", type=int, default=256, help="the sparse teacher's ids per row")
    p.add_argument("--chunk", type=int, default=0, help="chunk_size (0: the default)")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (else stdout)")
    p.add_argument("--child", nargs=6, metavar=("P", "N", "D", "V", "K", "CHUNK"), help="internal")
    args = p.parse_args(argv)
    if args.child:
        prov, *nums = args.child
        n, d, v, k, chunk = (int(s) for s in nums)
        print(json.dumps(child(prov, n, d, v, k, chunk or None)))
        return 0
    n, d, v = (int(s) for s in args.shape.split("x"))
    res = measure(n, d, v, args.k, args.chunk or None)
    env = base_environment(torch.device("cpu"))
    lines = [
        f"# Peak-RSS rise of one CPU forward + backward, distillation on a linear head: "
        f"{env['card']}, {env['date'][:10]}",
        "",
        f"torch {env['torch']}, python {env['python']}, commit {env['git_commit']}; float32, "
        f"N={n}, D={d}, V={v}, k={args.k}, chunk_size={args.chunk or 'default'}; one thread, "
        "a fresh process per provider after a 64-row warm-up call. The (N, V) float32 logits "
        f"would be {n * v * 4 / 2**20:.0f} MiB; the sparse teacher's ids and log-probabilities "
        f"{n * args.k * 12 / 2**20:.1f} MiB.",
        "",
        "| provider | peak rise MiB | vs lce |",
        "|---|---:|---:|",
    ]
    base = res["lce"]["rss_delta_mib"] if res["lce"] else None
    for prov in PROVIDERS:
        r = res[prov]
        if r is None:
            lines.append(f"| {prov} | failed | |")
            continue
        rise = r["rss_delta_mib"]
        vs = f"{rise - base:+.0f} MiB" if base is not None else ""
        lines.append(f"| {prov} | {rise:.0f} | {vs} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
