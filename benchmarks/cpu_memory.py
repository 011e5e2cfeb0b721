"""Peak-RSS rise of one CPU forward + backward: fusedce.cross_entropy against F.cross_entropy.

Each (provider, dtype, shape) runs in a fresh process: the inputs are built, one warm-up call on
64 rows of the same V pays the one-time costs (Inductor's compile of the CPU rows), then the
peak RSS of one full call is read (Linux's resettable VmHWM) and its rise over the RSS before the
call is reported, the (N, V) gradient included.

    python -m benchmarks.cpu_memory --shapes 4096x32000,1024x128256 --dtypes bf16,fp32 \\
        --out benchmarks/results/cpu-memory-2026-11-26.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import base_environment
from benchmarks.measure import rss_rise_mib, run_json_child

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fusedce", "eager")


def _loss(provider: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if provider == "fusedce":
        import fusedce

        return fusedce.cross_entropy(x, t)
    return F.cross_entropy(x, t)


def child(provider: str, n: int, v: int, dtype: str) -> dict[str, float]:
    """One measurement in this process (the --child mode)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, v, generator=g, dtype=DTYPES[dtype]).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    warm = x.detach()[:64].clone().requires_grad_()
    _loss(provider, warm, t[:64]).backward()
    del warm

    def step() -> None:
        _loss(provider, x, t).backward()

    _, rss = rss_rise_mib(step)
    rss["grad_mib"] = x.numel() * x.element_size() / 2**20
    return rss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x32000,1024x128256", help="NxV,NxV,...")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (else stdout)")
    p.add_argument("--child", nargs=4, metavar=("PROVIDER", "N", "V", "DTYPE"), help="internal")
    args = p.parse_args(argv)
    if args.child:
        prov, n, v, dt = args.child
        print(json.dumps(child(prov, int(n), int(v), dt)))
        return 0
    shapes = [tuple(int(a) for a in s.split("x")) for s in args.shapes.split(",")]
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    env = base_environment(torch.device("cpu"))
    lines = [
        f"# Peak-RSS rise of one CPU forward + backward: {env['card']}, {env['date'][:10]}",
        "",
        f"torch {env['torch']}, python {env['python']}, commit {env['git_commit']}; one thread,"
        " fresh process per measurement, after a 64-row warm-up call; the rise includes the"
        " (N, V) gradient.",
        "",
        "| dtype | N | V | gradient MiB | fusedce MiB | eager MiB | fusedce / eager |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dt in dtypes:
        for n, v in shapes:
            res = {}
            for prov in PROVIDERS:
                cmd = [sys.executable, "-m", "benchmarks.cpu_memory", "--child", prov]
                res[prov] = run_json_child([*cmd, str(n), str(v), dt])
            if any(r is None for r in res.values()):
                lines.append(f"| {dt} | {n} | {v} | | failed | | |")
                continue
            f, e = res["fusedce"]["rss_delta_mib"], res["eager"]["rss_delta_mib"]
            grad = res["fusedce"]["grad_mib"]
            ratio = f / e if e else float("nan")
            lines.append(f"| {dt} | {n} | {v} | {grad:.0f} | {f:.0f} | {e:.0f} | {ratio:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
