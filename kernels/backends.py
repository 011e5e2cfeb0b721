"""The backends that implement the row contract, and which one a call uses.

Two are registered:

* ``"torch"`` -- torch ops (``torch_backend.py``): CPU tensors, float64, and anywhere Triton is
  missing;
* ``"triton"`` -- the fused Triton kernel (``triton_backend.py``): CUDA tensors of float32,
  float16 or bfloat16, and CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).

``set_backend("auto")`` (the default, or the environment variable ``FUSEDCE_BACKEND`` at import)
picks per call: Triton where it can run, torch otherwise. A named backend is used wherever it can
take the tensors; float64 and devices it cannot run on still go to torch, so that naming one
never makes a call fail.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from . import torch_backend
from .options import KERNEL_DTYPES

try:  # Triton is optional: without it every call takes the torch backend.
    from . import triton_backend
except ImportError:  # pragma: no cover - depends on the platform
    triton_backend = None

# Read once: Triton itself decides at import time whether @triton.jit kernels are interpreted.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Backend:
    """One implementation of the row contract (``core.run_rows``).

    Attributes:
        name: what ``set_backend`` calls it.
        run_rows: fills the per-row statistics and the gradient; see ``core.run_rows``.
        takes: whether it can run a call on these tensors (logits, target, weight, grad, per-row
            scale wanted, gradient-only launch).
        experimental: not chosen by ``"auto"``.
    """

    name: str
    run_rows: Callable[..., None]
    takes: Callable[..., bool]
    experimental: bool = False


def _triton_can_run(logits: Tensor) -> bool:
    if triton_backend is None or logits.dtype not in KERNEL_DTYPES:
        return False
    return logits.is_cuda or (_INTERPRET and logits.device.type == "cpu")


_REGISTRY: dict[str, Backend] = {
    "torch": Backend("torch", torch_backend.run_rows, lambda *a: True),
    "triton": Backend(
        "triton",
        triton_backend.run_rows if triton_backend else torch_backend.run_rows,
        lambda logits, *a: _triton_can_run(logits),
    ),
}
_CHOICES = ("auto", *_REGISTRY)


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"fusedce: unknown backend {name!r}; choose one of {_CHOICES}")
    return name


_current = _check_name(os.environ.get("FUSEDCE_BACKEND", "auto").strip().lower() or "auto")


def available_backends() -> tuple[str, ...]:
    """The backends that can run in this process (``"torch"`` always; ``"triton"`` where Triton
    imports)."""
    return ("torch", "triton") if triton_backend is not None else ("torch",)


def get_backend() -> str:
    """The current setting: ``"auto"`` or a backend's name."""
    return _current


def set_backend(name: str) -> None:
    """Chooses the backend for every later call: ``"auto"`` (default), ``"torch"`` or
    ``"triton"``. Raises ValueError for other names."""
    global _current
    _current = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``set_backend(name)`` inside a ``with`` block, the previous setting restored after."""
    global _current
    previous, _current = _current, _check_name(name)
    try:
        yield
    finally:
        _current = previous


def uses_triton(t: Tensor) -> bool:
    """Whether a tensor of this device and dtype runs a Triton kernel (vs the torch backend)."""
    return _current != "torch" and _triton_can_run(t)


def select(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad: Tensor | None,
    per_row_scale: bool,
    grad_only: bool,
) -> Backend:
    """The backend that runs this call, by the current setting (see the module doc)."""
    args = (logits, target, weight, grad, per_row_scale, grad_only)
    if _current != "auto":
        chosen = _REGISTRY[_current]
        if chosen.takes(*args):
            return chosen
    triton = _REGISTRY["triton"]
    if _current != "torch" and triton.takes(*args):
        return triton
    return _REGISTRY["torch"]


__all__ = [
    "Backend",
    "available_backends",
    "get_backend",
    "select",
    "set_backend",
    "use_backend",
    "uses_triton",
]
