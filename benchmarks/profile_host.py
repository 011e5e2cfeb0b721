"""Where the host time of one ``fusedce.cross_entropy`` call goes.

Small calls are bound by the host: the time from Python entry to the last kernel launch. This
script measures that time per call (back-to-back calls, synchronised once at the end), for
fusedce and eager ``F.cross_entropy``, and per launch of each Triton launcher on its own, then
prints a cProfile of fusedce's forward + backward sorted by own time.

On a GPU it measures the real thing. With ``--device cpu`` under Triton's interpreter (no GPU
needed) it measures what surrounds the launches: CPU tensors take the Triton path there, and
every jit kernel is replaced by a stub that launches nothing, so the times are those of
fusedce's Python and torch ops alone (the launches themselves, 14-31 us each on an H200, are not
in them): the part a change of the host code moves. Eager ``F.cross_entropy`` computes on the
CPU there: a reference, not a peer.

    python -m benchmarks.profile_host [--n 16] [--v 32000] [--dtype bf16] [--calls 300]
    TRITON_INTERPRET=1 python -m benchmarks.profile_host --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import fusedce
from benchmarks.measure import sync
from fusedce import core
from fusedce.backends import triton_kernels
from fusedce.options import LossOptions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The jit kernels a plain call launches, and (for the stub) the position of the bad-index count
# the mean-scale kernel writes: a stub leaves it zero, so the index check passes.
KERNELS = ("_cross_entropy_kernel", "_mean_scale_kernel", "_reduce_kernel", "_multiply_rows_kernel")
_BAD_COUNT_ARG = 4


class _StubKernel:
    """``kernel[grid](*args)`` that launches nothing (the mean-scale kernel's count: zeroed)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, grid: object) -> Callable[..., None]:
        if self.name == "_mean_scale_kernel":
            return lambda *args, **kwargs: args[_BAD_COUNT_ARG].zero_()
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[None]:
    """The launchers' jit kernels replaced by stubs that launch nothing."""
    saved = {name: getattr(triton_kernels, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(triton_kernels, name, _StubKernel(name))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(triton_kernels, name, kernel)


def host_us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Microseconds of host time per call over ``calls`` back-to-back calls."""
    for _ in range(10):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync(device)
    return (t1 - t0) / calls * 1e6


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Host microseconds per call of each row of the report (printed as it goes)."""
    dev = torch.device(args.device)
    x = torch.randn(args.n, args.v, device=dev, dtype=DTYPES[args.dtype], requires_grad=True)
    y = torch.randint(0, args.v, (args.n,), device=dev)

    # x.grad is dropped before each backward: accumulating into it would add a pass over the
    # logits (on the CPU, real arithmetic) that is neither call's own.
    def fused_fb() -> None:
        x.grad = None
        fusedce.cross_entropy(x, y).backward()

    def eager_fb() -> None:
        x.grad = None
        F.cross_entropy(x, y).backward()

    def fused_f() -> None:
        with torch.no_grad():
            fusedce.cross_entropy(x, y)

    M, V = args.n, args.v
    xd = x.detach()
    stats = core.new_stats(M, xd.dtype, dev)
    grad = torch.empty_like(xd)
    scale = torch.ones((), device=dev)
    opts = LossOptions(-100, 0.0, "mean")
    rows: dict[str, Callable[[], object]] = {
        "fusedce fwd+bwd": fused_fb,
        "eager fwd+bwd": eager_fb,
        "fusedce fwd (no grad)": fused_f,
        "triton run_rows (loss + grad)": lambda: triton_kernels.run_rows(
            xd, y, None, opts, stats, grad, scale
        ),
        "triton mean_scale_and_bad_count": lambda: triton_kernels.mean_scale_and_bad_count(
            y, None, -100, M, V, True, True
        ),
        "triton sum_rows": lambda: triton_kernels.sum_rows(stats[0], scale, True),
        "triton multiply_rows_": lambda: triton_kernels.multiply_rows_(grad, scale),
        "core.new_stats (one torch.empty)": lambda: core.new_stats(M, xd.dtype, dev),
        "core.forward": lambda: core.forward(xd, y, None, opts, True),
    }
    out = {}
    for name, fn in rows.items():
        out[name] = host_us(fn, args.calls, dev)
        print(f"{name:40s} {out[name]:8.1f} us/call (host)", flush=True)
        if name == "fusedce fwd (no grad)":
            fusedce.set_target_check(False)
            try:
                off = host_us(fused_fb, args.calls, dev)
            finally:
                fusedce.set_target_check(True)
            out["fusedce fwd+bwd, index check off"] = off
            print(f"{'fusedce fwd+bwd, index check off':40s} {off:8.1f} us/call (host)")

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        fused_fb()
    prof.disable()
    sync(dev)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    print(f"cProfile of {args.calls} fusedce fwd+bwd calls (own time):")
    print(buf.getvalue()[:9000])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=300)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Entry point: the report's rows (host us per call), printed; see the module doc."""
    args = parse_args(argv)
    where = "kernels stubbed: host code alone" if args.device == "cpu" else "GPU"
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"N={args.n} V={args.v} {args.dtype}; {card} ({where}); backend {fusedce.get_backend()}")
    if args.device == "cuda":
        return measure(args)
    if not fusedce.uses_triton(torch.empty(0, dtype=DTYPES[args.dtype])):
        raise SystemExit(
            "profile_host --device cpu: CPU tensors take the Triton path only under Triton's "
            "interpreter; run it with TRITON_INTERPRET=1 in the environment"
        )
    with stubbed_kernels():
        return measure(args)


if __name__ == "__main__":
    main()
