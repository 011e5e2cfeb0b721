"""Launch configurations of the fused kernel, side by side on one GPU (device time, do_bench).

For each shape it times the kernel's forward + gradient launch (``triton_kernels.run_rows`` with
a gradient) under several (BLOCK_M, BLOCK_V, SINGLE_TILE, num_warps) choices, checks each result
against float32 torch, and prints the time relative to a copy of the logits (read + write once).

    python -m benchmarks.tune_launch [--shapes 8192x32000,...] [--dtypes bf16,fp32]
"""

from __future__ import annotations

import argparse

import torch
import triton
from triton.testing import do_bench

from fusedce.backends import triton_kernels
from fusedce.options import LossOptions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = "8192x32000,4096x65536,16384x50257,8192x128256,4096x256000"


def candidates(V: int) -> list[tuple[int, int, bool, int]]:
    """(BLOCK_M, BLOCK_V, SINGLE_TILE, num_warps) choices for rows of V classes."""
    out = []
    v2 = triton.next_power_of_2(V)
    if v2 <= 65536:
        for warps in (8, 16, 32):
            out.append((1, v2, True, warps))
    for block_v in (4096, 8192, 16384):
        for warps in (8, 16):
            out.append((1, block_v, False, warps))
    return out


def tune_shape(M: int, V: int, dname: str) -> None:
    """Prints one table row per candidate configuration for (M, V) logits of ``dname``."""
    dev = torch.device("cuda")
    opts = LossOptions(-100, 0.0, "mean")
    x = torch.randn(M, V, device=dev, dtype=DTYPES[dname]) * 3
    y = torch.randint(0, V, (M,), device=dev)
    ref = torch.softmax(x.float(), dim=-1)
    ref[torch.arange(M, device=dev), y] -= 1.0
    ref /= M
    copy = do_bench(lambda: torch.empty_like(x).copy_(x), warmup=5, rep=40)
    original = triton_kernels._launch_config
    default = original(M, V, x.element_size(), False)
    stats = torch.empty(3, M, device=dev)
    grad = torch.empty_like(x)
    scale = torch.full((), 1.0 / M, device=dev)

    def launch() -> None:
        triton_kernels.run_rows(x, y, None, opts, stats, grad, scale)

    for cfg in candidates(V):
        triton_kernels._launch_config = lambda *_, c=cfg: c
        try:
            grad.zero_()
            launch()
            torch.cuda.synchronize()
            err = (grad.float() - ref).abs().max().item()
            ms = do_bench(launch, warmup=5, rep=40)
            mark, rel = ("*" if cfg == default else ""), ms / copy
            print(
                f"| {dname} | {M} | {V} | {cfg} | {ms:.4f} | {rel:.2f} | {err:.1e} | {mark} |",
                flush=True,
            )
        except Exception as exc:  # a configuration that does not compile
            print(f"| {dname} | {M} | {V} | {cfg} | failed: {type(exc).__name__} | | | |")
        finally:
            triton_kernels._launch_config = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--dtypes", default="bf16,fp32")
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    print("| dtype | N | V | config (BM, BV, single, warps) | ms | x copy | grad err | default |")
    print("|---|---|---|---|---|---|---|---|")
    for dname in a.dtypes.split(","):
        for shape in a.shapes.split(","):
            M, V = (int(s) for s in shape.split("x"))
            tune_shape(M, V, dname)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
