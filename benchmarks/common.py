"""What both benchmarks share: the run's environment (card, versions, commit), the device, the
file-name slug and small output helpers (number formatting, JSON, matplotlib)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CPU_CARD_NAME = f"CPU ({os.cpu_count()}-core dev machine, no GPU)"


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes that each keep one core busy (a pure-Python loop) for the block's
    duration: a shared laptop or CI runner, where another job takes a core. Yields the
    processes; killed after."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(max(0, n))
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def git_commit() -> str:
    """Short commit of the working tree (``+dirty`` when it has changes), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return os.environ.get("FUSEDCE_GIT_COMMIT", "unknown")


def card_name(device: torch.device) -> str:
    """The device's name: torch.cuda.get_device_name, or the CPU label."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return CPU_CARD_NAME


def slug(name: str) -> str:
    """File-name form of a card name: "NVIDIA H200" -> "nvidia-h200", CPU labels -> "cpu"."""
    if name.startswith("CPU"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def base_environment(device: torch.device, card: str | None = None) -> dict[str, Any]:
    """Card (``card`` overrides the detected name), versions, host, UTC date, commit, argv."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "card": card or card_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "argv": sys.argv[1:],
        "torch_threads": torch.get_num_threads(),
    }


def pick_device(name: str | None) -> torch.device:
    """``name`` ("cuda", "cpu", ...) or, when None, CUDA where available and the CPU otherwise."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def csv(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated command-line value."""
    return [s.strip() for s in text.split(",") if s.strip()]


def fmt(value: Any, spec: str = ".3f") -> str:
    """A value for a markdown table: "n/a" for None, "nan" for NaN, numbers by ``spec``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    if isinstance(value, int):
        return format(value, spec)
    return str(value)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on a benchmark machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: Path, report: dict[str, Any], indent: int = 1) -> None:
    """Writes a report as JSON (values JSON cannot hold, like paths, as their text)."""
    path.write_text(json.dumps(report, indent=indent, default=str) + "\n")
