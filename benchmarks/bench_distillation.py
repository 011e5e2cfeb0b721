"""Time of one forward + backward of the fused distillation head against
``fusedce.linear_cross_entropy`` at the same shape: the GPU goals are the sparse teacher
(top-k) at most 1.10x and the dense teacher head (two GEMM heads) at most 2.1x.

    python -m benchmarks.bench_distillation --shape 8192x4096x128256 --dtype bf16 --k 256 \\
        --out benchmarks/results/<card>-distill-<date>.md

On CUDA the medians come from ``triton.testing.do_bench``; on the CPU from interleaved calls
(a smoke run: CPU times say nothing of the GPU goals).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

import fusedce
from benchmarks.common import base_environment, pick_device
from benchmarks.measure import cpu_interleaved_ms, cuda_median_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The goals of the issue, as ratios to linear_cross_entropy's time.
GOALS = {"lce": 1.0, "sparse": 1.10, "dense": 2.1}


def calls(
    n: int, d: int, v: int, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[dict[str, Callable[[], None]], list[torch.Tensor]]:
    """{provider: one forward + backward} and the tensors whose gradients each call resets."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    W = torch.randn(v, d, generator=g).to(device, dtype).requires_grad_()
    tx = (torch.randn(n, d, generator=g) / d**0.5).to(device, dtype)
    tW = torch.randn(v, d, generator=g).to(device, dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    # The teacher's top-k: distinct ids (a random permutation's first k per row is too slow to
    # draw at 128k classes; k strided ids from a random start are distinct and cover the row).
    start = torch.randint(0, v, (n, 1), generator=g)
    ids = ((start + torch.arange(k) * (v // k)) % v).to(device)
    logp = (torch.log_softmax(torch.randn(n, k, generator=g), 1) - 0.05).to(device)

    def lce() -> None:
        fusedce.linear_cross_entropy(x, W, y).backward()

    def sparse() -> None:
        fusedce.linear_distillation_loss(x, W, teacher_ids=ids, teacher_log_probs=logp).backward()

    def dense() -> None:
        fusedce.linear_distillation_loss(x, W, teacher_input=tx, teacher_weight=tW).backward()

    return {"lce": lce, "sparse": sparse, "dense": dense}, [x, W]


def measure(
    n: int, d: int, v: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int = 3
) -> dict[str, float]:
    """{provider: median ms of one forward + backward}."""
    fns, params = calls(n, d, v, k, dtype, device)
    if device.type == "cuda":
        return {name: cuda_median_ms(fn, grad_to_none=params) for name, fn in fns.items()}
    samples = cpu_interleaved_ms(fns, repeats)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256", help="NxDxV")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where present)")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (else stdout)")
    args = p.parse_args(argv)
    n, d, v = (int(s) for s in args.shape.split("x"))
    device = pick_device(args.device)
    ms = measure(n, d, v, args.k, DTYPES[args.dtype], device)
    env = base_environment(device)
    lines = [
        f"# Fused distillation head against linear_cross_entropy: {env['card']}, "
        f"{env['date'][:10]}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}; "
        f"{args.dtype}, N={n}, D={d}, V={v}, k={args.k}; forward + backward, median ms.",
        "",
        "| provider | ms | / lce | goal |",
        "|---|---:|---:|---:|",
    ]
    for name, t in ms.items():
        lines.append(f"| {name} | {t:.3f} | {t / ms['lce']:.2f} | <= {GOALS[name]:.2f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
