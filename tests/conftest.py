"""Shared pytest set-up: GPU tests skip themselves where no CUDA device exists."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch


def _inductor_cache_dir() -> str:
    """An Inductor cache per version of the package's sources: Inductor keys compiled graphs on
    the traced graph, not on a custom op's fake, so a cache written by other code with the same
    op schemas (another checkout, an earlier commit) could hand back outputs of stale shapes."""
    root = Path(__file__).resolve().parents[1] / "kernels"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return str(Path(tempfile.gettempdir()) / f"fusedce_inductor_{digest.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

# Under pytest-xdist (``make test`` runs the suite in several workers) each worker computes on
# one thread: workers that each spread over every core would oversubscribe the machine. The
# processes the tests start (train.py, gloo ranks) choose their own threads as before.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# `-m "kernel"` or `-m "kernel and ..."`: only tests marked `kernel` can be selected.
_KERNEL_ONLY = re.compile(r"\s*kernel(\s+and\b.*)?\s*")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under a marker expression that only kernel tests satisfy (the kernel suites of `make
    test`), a test file that never writes ``mark.kernel`` holds none of them: it is not imported
    at all, which spares each worker of those suites the import of Lightning, transformers and
    TRL (about half of a worker's collection time)."""
    if not _KERNEL_ONLY.fullmatch(config.getoption("markexpr") or ""):
        return None
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "mark.kernel" not in collection_path.read_text()
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state: unseeded draws are reproducible."""
    torch.manual_seed(0)
