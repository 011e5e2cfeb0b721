"""The backends that implement the row contract, and which one a call uses.

Two are registered:

* ``"torch"`` -- torch ops (``torch_ops.py``): CPU tensors, float64, and anywhere Triton is
  missing; on the CPU large plain calls take the Inductor-compiled rows (``cpu_compiled.py``)
  and small plain calls torch's own ``F.cross_entropy`` (``small_calls.py``);
* ``"triton"`` -- the fused Triton kernel (``triton_jit.py``, launched by ``triton_kernels.py``:
  the only modules that import Triton): CUDA tensors of float32, float16 or bfloat16, and CPU
  tensors under Triton's interpreter (``TRITON_INTERPRET=1``).

Each is a ``Backend``: everything ``core`` asks of one (the rows, the mean scale with the
class-index count, the reduction of the row losses, the scaling by the upstream gradient).

``"auto"`` (the default) picks per call: Triton where it can run, torch otherwise. A named
backend is used wherever it can take the tensors; float64 and devices it cannot run on still go
to torch, so that naming one never makes a call fail.

The choice has two levels:

* the process default: ``set_backend(name)``, or the environment variable ``FUSEDCE_BACKEND``
  read at import;
* ``use_backend(name)``: a ``with`` block that overrides the default in the calling context only
  (a ``contextvars.ContextVar``: the current thread, or the current asyncio task). Other threads
  and tasks keep their own choice, overlapping blocks in two threads do not see each other, and
  on exit the context goes back to what it had before the block.

``get_backend()`` returns the choice in effect for the calling context: the innermost
``use_backend`` block, else the process default. A new thread starts without an override, so it
sees the process default. Names are read case-insensitively with surrounding whitespace ignored
(``" Torch "`` is ``"torch"``), in ``set_backend``, ``use_backend`` and ``FUSEDCE_BACKEND``
alike; an unknown name raises ``ValueError`` (for the environment variable, at import, naming
it).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from ..options import KERNEL_DTYPES
from . import small_calls, torch_ops

# The one place that asks whether Triton is there: without it every call takes the torch backend.
try:
    from . import triton_kernels
except ImportError:  # pragma: no cover - depends on the platform
    triton_kernels = None

# Read once: Triton itself decides at import time whether @triton.jit kernels are interpreted.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Backend:
    """One implementation of the row contract and of the reductions around it: what ``core``
    calls. Tensors are as ``core.run_rows`` describes them.

    Attributes:
        name: what ``set_backend`` calls it.
        takes: ``(logits, target, weight, grad, per_row_scale, grad_only) -> bool``, whether it
            can run a call on these tensors.
        run_rows: ``(logits, target, weight, opts, stats, grad, scale, grad_only, token_weight)``
            fills the per-row statistics and the gradient; see ``core.run_rows``.
        rows_per_call: ``(logits, target, weight, opts, stats, grad_only, token_weight) -> int``,
            how many rows one ``run_rows`` call takes (``core`` splits a larger call in blocks).
        mean_scale: ``(logits, target, weight, opts, check, token_weight) -> (scale, n_bad)``,
            the () gradient scale (1 / the mean normaliser, or 1) and, with ``check``, the ()
            count of out-of-range class indices (else None); no host sync.
        reduce_rows: ``(loss_rows, scale, mean) -> Tensor``, the () sum of the per-row losses,
            times ``scale`` when ``mean``.
        scale_rows_: ``(grad, factor) -> None``, ``grad *= factor`` in place for a () factor.
        small_call: for calls on the "auto" setting, a shortcut that may take a whole call
            (``small_calls.cross_entropy``), or None.
    """

    name: str
    takes: Callable[..., bool]
    run_rows: Callable[..., None]
    rows_per_call: Callable[..., int]
    mean_scale: Callable[..., tuple[Tensor, Tensor | None]]
    reduce_rows: Callable[[Tensor, Tensor, bool], Tensor]
    scale_rows_: Callable[[Tensor, Tensor], None]
    small_call: Callable[..., object] | None = None


def _triton_can_run(logits: Tensor) -> bool:
    if triton_kernels is None or logits.dtype not in KERNEL_DTYPES:
        return False
    return logits.is_cuda or (_INTERPRET and logits.device.type == "cpu")


def _module_backend(name: str, module, takes, small_call=None) -> Backend:
    return Backend(
        name,
        takes,
        module.run_rows,
        module.rows_per_call,
        module.mean_scale,
        module.reduce_rows,
        module.scale_rows_,
        small_call,
    )


_TORCH = _module_backend("torch", torch_ops, lambda *a: True, small_calls.cross_entropy)
_REGISTRY: dict[str, Backend] = {
    "torch": _TORCH,
    "triton": (
        _module_backend("triton", triton_kernels, lambda logits, *a: _triton_can_run(logits))
        if triton_kernels is not None
        # Never taken (nothing runs Triton): the name stays valid for set_backend.
        else dataclasses.replace(_TORCH, name="triton", takes=lambda *a: False, small_call=None)
    ),
}
_CHOICES = ("auto", *_REGISTRY)


def _check_name(name: object) -> str:
    """``name`` as a choice: case-insensitive, surrounding whitespace ignored."""
    choice = name.strip().lower() if isinstance(name, str) else name
    if choice not in _CHOICES:
        raise ValueError(f"fusedce: unknown backend {name!r}; choose one of {_CHOICES}")
    return choice


def _default_from_environment() -> str:
    """The process default from ``FUSEDCE_BACKEND`` (unset or empty: ``"auto"``)."""
    value = os.environ.get("FUSEDCE_BACKEND", "")
    if not value.strip():
        return "auto"
    try:
        return _check_name(value)
    except ValueError:
        raise ValueError(
            f"fusedce: the environment variable FUSEDCE_BACKEND={value!r} is not a backend; "
            f"set it to one of {_CHOICES} (case-insensitive) or unset it"
        ) from None


# The process default (set_backend, FUSEDCE_BACKEND), and the calling context's override
# (use_backend; None: no override, the process default applies).
_default = _default_from_environment()
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fusedce_backend", default=None
)


def _choice() -> str:
    override = _override.get()
    return _default if override is None else override


def available_backends() -> tuple[str, ...]:
    """The backends that can run in this process (``"torch"`` always; ``"triton"`` where Triton
    imports)."""
    return ("torch", "triton") if triton_kernels is not None else ("torch",)


def get_backend() -> str:
    """The setting in effect for the calling thread or task: ``"auto"`` or a backend's name (the
    innermost ``use_backend`` block, else the process default)."""
    return _choice()


def set_backend(name: str) -> None:
    """Sets the process default: ``"auto"`` (the initial default), ``"torch"`` or ``"triton"``
    (case-insensitive). Every thread and task uses it outside ``use_backend`` blocks (a block
    that is open keeps its own choice until it exits). Raises ValueError for other names."""
    global _default
    _default = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """The backend ``name`` for the calling thread or asyncio task inside a ``with`` block; other
    threads and tasks are not affected, and the previous choice is back after the block."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def uses_triton(t: Tensor) -> bool:
    """Whether a tensor of this device and dtype runs a Triton kernel (vs the torch backend)."""
    return _choice() != "torch" and _triton_can_run(t)


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
    choice = _choice()
    if choice != "auto":
        chosen = _REGISTRY[choice]
        if chosen.takes(*args):
            return chosen
    triton = _REGISTRY["triton"]
    if choice != "torch" and triton.takes(*args):
        return triton
    return _REGISTRY["torch"]


def registered(name: str) -> Backend:
    """The ``Backend`` registered as ``name`` (``"torch"`` or ``"triton"``)."""
    choice = _check_name(name)
    if choice == "auto":
        raise ValueError('fusedce: "auto" is a setting, not a registered backend')
    return _REGISTRY[choice]


@contextlib.contextmanager
def replaced(backend: Backend) -> Iterator[None]:
    """Registers ``backend`` in place of the backend of its name inside a ``with`` block, for
    every thread (an instrumentation hook: a test wraps ``run_rows`` to count the calls); the
    original is registered again after the block."""
    original = registered(backend.name)
    _REGISTRY[original.name] = backend
    try:
        yield
    finally:
        _REGISTRY[original.name] = original


def for_tensor(t: Tensor) -> Backend:
    """The backend that computes the reductions around the rows for a tensor of this device and
    dtype (the mean scale, the sum of the row losses, the upstream scaling): Triton where
    ``uses_triton(t)``, else torch."""
    return _REGISTRY["triton" if uses_triton(t) else "torch"]


def small_call(t: Tensor) -> Callable[..., object] | None:
    """The shortcut that may take a whole call on logits like ``t`` (the torch backend's: small
    plain CPU calls to ``F.cross_entropy``, ``small_calls.cross_entropy``), or None. Only the
    "auto" setting takes one: a named backend keeps the row contract."""
    return for_tensor(t).small_call if _choice() == "auto" else None


__all__ = [
    "Backend",
    "available_backends",
    "for_tensor",
    "get_backend",
    "registered",
    "replaced",
    "select",
    "set_backend",
    "small_call",
    "use_backend",
    "uses_triton",
]
