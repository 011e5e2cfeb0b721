"""Launch configurations of the fused kernel, side by side on one GPU (device time, do_bench).

For each shape it times the kernel's forward + gradient launch (``triton_kernels.run_rows`` with
a gradient) under several (BLOCK_M, BLOCK_V, SINGLE_TILE, num_warps) choices, checks each result
against float32 torch, and prints the time relative to a copy of the logits (read + write once).

    python -m benchmarks.tune_launch [--shapes 8192x32000,...] [--dtypes bf16,fp32]

``--device cpu`` under Triton's interpreter (``TRITON_INTERPRET=1``, tiny shapes) runs the same
candidates without a GPU: their results checked, their times meaningless; it checks the script.
Exit status 1 when a configuration gave a wrong gradient or no configuration of a shape ran.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import triton

import fusedce
from benchmarks.measure import cpu_median_ms, cuda_median_ms
from fusedce import core
from fusedce.backends import triton_kernels
from fusedce.backends.grid import next_pow2
from fusedce.options import LossOptions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = "8192x32000,4096x65536,16384x50257,8192x128256,4096x256000"


def candidates(V: int) -> list[tuple[int, int, bool, int]]:
    """(BLOCK_M, BLOCK_V, SINGLE_TILE, num_warps) choices for rows of V classes."""
    out = []
    v2 = next_pow2(V)
    if v2 <= 65536:
        for warps in (8, 16, 32):
            out.append((1, v2, True, warps))
    for block_v in (4096, 8192, 16384):
        for warps in (8, 16):
            out.append((1, block_v, False, warps))
    return out


def bench_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of ``fn``: do_bench on the GPU, three timed calls on the CPU."""
    if device.type == "cuda":
        return cuda_median_ms(fn, warmup_ms=5, rep_ms=40)
    return cpu_median_ms(fn, budget_s=0.0)


def tune_shape(M: int, V: int, dname: str, device: torch.device) -> bool:
    """Prints one table row per candidate configuration for (M, V) logits of ``dname``; whether
    every configuration that ran gave the right gradient and at least one ran."""
    opts = LossOptions(-100, 0.0, "mean")
    x = torch.randn(M, V, device=device, dtype=DTYPES[dname]) * 3
    y = torch.randint(0, V, (M,), device=device)
    ref = torch.softmax(x.float(), dim=-1)
    ref[torch.arange(M, device=device), y] -= 1.0
    ref /= M
    bound = 2e-2 * ref.abs().max().item()  # a few half-precision roundings of the largest value
    copy = bench_ms(lambda: torch.empty_like(x).copy_(x), device)
    original = triton_kernels._launch_config
    default = original(M, V, x.element_size(), device.type != "cuda")
    stats = core.new_stats(M, x.dtype, device)
    grad = torch.empty_like(x)
    scale = torch.full((), 1.0 / M, device=device)

    def launch() -> None:
        triton_kernels.run_rows(x, y, None, opts, stats, grad, scale)

    ran, right = 0, True
    for cfg in candidates(V):
        triton_kernels._launch_config = lambda *_, c=cfg: c
        try:
            grad.zero_()
            launch()
            if device.type == "cuda":
                torch.cuda.synchronize()
            err = (grad.float() - ref).abs().max().item()
            ms = bench_ms(launch, device)
            mark, rel = ("*" if cfg == default else ""), ms / copy
            flag = "" if err <= bound else " WRONG"
            right &= err <= bound
            ran += 1
            row = f"| {dname} | {M} | {V} | {cfg} | {ms:.4f} | {rel:.2f} | {err:.1e}{flag} |"
            print(f"{row} {mark} |", flush=True)
        except Exception as exc:  # a configuration that does not compile (or fit)
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            print(f"| {dname} | {M} | {V} | {cfg} | failed: {why} | | | |", flush=True)
        finally:
            triton_kernels._launch_config = original
    return right and ran > 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if not fusedce.uses_triton(torch.empty(0, device=device)):
        raise SystemExit(
            f"tune_launch: {a.device} tensors do not take the Triton kernel here (a GPU, or CPU "
            "tensors under TRITON_INTERPRET=1)"
        )
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{card}; torch {torch.__version__}, triton {triton.__version__}")
    print("| dtype | N | V | config (BM, BV, single, warps) | ms | x copy | grad err | default |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for dname in a.dtypes.split(","):
        for shape in a.shapes.split(","):
            M, V = (int(s) for s in shape.split("x"))
            ok &= tune_shape(M, V, dname, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
