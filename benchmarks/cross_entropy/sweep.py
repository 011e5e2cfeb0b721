"""The sweep: which (mode, dtype, N, V) cells run, and in what order."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

MODES = ("fwd_bwd", "fwd")
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
SWEEP_V = (2, 1024, 32000, 50257, 128256, 256000)
LATENCY_V = 32000
LATENCY_N_GPU = (1, 16, 256, 2048)
LATENCY_N_CPU = (1, 16, 256)
# The shapes of the H200 reference measurements (benchmarks/reference/h200-2026-11-26, the
# anchors file), forward + backward, for direct comparison.
ANCHOR_SHAPES = ((8192, 32000, "bf16"), (8192, 128256, "bf16"), (4096, 256000, "bf16"))
ANCHOR_SHAPES_FP32 = ((8192, 128256, "fp32"),)
QUICK_SHAPES = ((1024, 2), (16, 32000))
MAX_N = 65536
GPU_SWEEP_BYTES = 2**30  # big-V rows: logits of at least 1 GiB (several times the L2)
CPU_SWEEP_BYTES = 16 * 2**20
CPU_SWEEP_V = (2, 1024, 32000, 50257, 128256)


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
    (large V first), then the anchor shapes, then the small-N latency rows. ``shapes`` (N, V)
    replace the sweep; ``quick`` is a tiny CPU-sized one.
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


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"8192x128256,16x32000"`` -> [(8192, 128256), (16, 32000)]."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if item:
            n, v = item.lower().split("x")
            out.append((int(n), int(v)))
    return out
