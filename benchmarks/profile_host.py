"""Where the host time of one ``fusedce.cross_entropy`` call goes (GPU machines).

Small calls are bound by the host: the time from Python entry to the last kernel launch. This
script measures that time per call (back-to-back calls, synchronised once at the end), for
fusedce and eager ``F.cross_entropy``, and per launch of each Triton launcher on its own, then
prints a cProfile of fusedce's forward + backward sorted by own time.

    python -m benchmarks.profile_host [--n 16] [--v 32000] [--dtype bf16] [--calls 300]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedce
from fusedce import core
from fusedce.backends import triton_kernels
from fusedce.options import LossOptions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def host_us(fn: Callable[[], object], calls: int) -> float:
    """Microseconds of host time per call over ``calls`` back-to-back calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=300)
    a = p.parse_args()
    dev = torch.device("cuda")
    x = torch.randn(a.n, a.v, device=dev, dtype=DTYPES[a.dtype], requires_grad=True)
    y = torch.randint(0, a.v, (a.n,), device=dev)
    card = torch.cuda.get_device_name()
    print(f"N={a.n} V={a.v} {a.dtype}; {card}; backend {fusedce.get_backend()}")

    def fused_fb() -> None:
        fusedce.cross_entropy(x, y).backward()

    def eager_fb() -> None:
        F.cross_entropy(x, y).backward()

    def fused_f() -> None:
        with torch.no_grad():
            fusedce.cross_entropy(x, y)

    rows = {
        "fusedce fwd+bwd": fused_fb,
        "eager fwd+bwd": eager_fb,
        "fusedce fwd (no grad)": fused_f,
    }
    for name, fn in rows.items():
        print(f"{name:40s} {host_us(fn, a.calls):8.1f} us/call (host)")
    fusedce.set_target_check(False)
    off = host_us(fused_fb, a.calls)
    print(f"{'fusedce fwd+bwd, index check off':40s} {off:8.1f} us/call (host)")
    fusedce.set_target_check(True)

    # Each launcher on its own.
    M, V = a.n, a.v
    xd = x.detach()
    stats = torch.empty(3, M, device=dev)
    grad = torch.empty_like(xd)
    scale = torch.ones((), device=dev)
    opts = LossOptions(-100, 0.0, "mean")
    launches = {
        "triton run_rows (loss + grad)": lambda: triton_kernels.run_rows(
            xd, y, None, opts, stats, grad, scale
        ),
        "triton mean_scale_and_bad_count": lambda: triton_kernels.mean_scale_and_bad_count(
            y, None, -100, M, V, True, True
        ),
        "triton sum_rows": lambda: triton_kernels.sum_rows(stats[0], scale, True),
        "triton multiply_rows_": lambda: triton_kernels.multiply_rows_(grad, scale),
        "torch.empty((3, M))": lambda: torch.empty(3, M, device=dev),
        "core.forward": lambda: core.forward(xd, y, None, opts, True),
    }
    for name, fn in launches.items():
        print(f"{name:40s} {host_us(fn, a.calls):8.1f} us/call (host)")

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        fused_fb()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    print(f"cProfile of {a.calls} fusedce fwd+bwd calls (own time):")
    print(buf.getvalue()[:9000])


if __name__ == "__main__":
    main()
