"""The providers: what a cell times. Each is a loss function of (logits (N, V), target (N,))
returning the mean loss (a 0-dim tensor); ``make_step`` wraps it into forward or
forward + backward."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

import fusedce
from fusedce.index_check import target_check_enabled

ALL_PROVIDERS = (
    "fusedce",
    "fusedce_inplace",
    "fusedce_nocheck",
    "eager",
    "compile",
    "liger",
    "fusedce_gluon",
)
# The experimental shared-memory kernel runs only when asked for (--providers ...,fusedce_gluon).
DEFAULT_PROVIDERS = tuple(p for p in ALL_PROVIDERS if p != "fusedce_gluon")
RIVALS = ("eager", "compile", "liger")
# Providers that overwrite the logits with the gradient: they get their own copy of the input.
DESTRUCTIVE = ("fusedce_inplace", "liger")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _torch_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def _fused(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return fusedce.cross_entropy(logits, target)


def _fused_inplace(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # inplace_backward refuses a leaf that requires grad; a view is a non-leaf, as the output of
    # a model's last layer would be, and costs no copy.
    return fusedce.cross_entropy(logits.view_as(logits), target, inplace_backward=True)


def _fused_nocheck(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    previous = target_check_enabled()
    fusedce.set_target_check(False)
    try:
        return fusedce.cross_entropy(logits, target)
    finally:
        fusedce.set_target_check(previous)


def gluon_backend() -> ModuleType:
    """The experimental shared-memory backend's module (ImportError without Gluon)."""
    return importlib.import_module("fusedce.gluon_backend")


def _fused_gluon(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fusedce with the experimental shared-memory kernel selected for this call.

    The ``gluon`` backend hands shapes it does not cover to the Triton kernel; here such a
    shape is an error instead, so that the column never times the other kernel under its name.
    """
    if not gluon_backend().supports(logits, target, None):
        raise RuntimeError("shape not covered by the shared-memory kernel (see its supports())")
    with fusedce.use_backend("gluon"):
        return fusedce.cross_entropy(logits, target)


def gluon_available(on_cuda: bool) -> str | None:
    """Why the shared-memory kernel cannot run here, or None when it can."""
    if not on_cuda:
        return "no CUDA device"
    if torch.cuda.get_device_capability()[0] != 9:
        return "not a Hopper GPU"
    if "gluon" not in fusedce.available_backends():
        return "the gluon backend is not available (a triton without the Gluon dialect?)"
    try:
        gluon_backend()
    except ImportError as exc:
        return f"Gluon not importable ({exc})"
    return None


def liger_version() -> str | None:
    """Liger-Kernel's version if ``liger_kernel`` imports, else None."""
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("liger_kernel", "liger-kernel"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def make_loss_fn(name: str) -> LossFn:
    """The loss function of a provider (a fresh torch.compile for ``compile``)."""
    fixed: dict[str, LossFn] = {
        "fusedce": _fused,
        "fusedce_inplace": _fused_inplace,
        "fusedce_nocheck": _fused_nocheck,
        "fusedce_gluon": _fused_gluon,
        "eager": _torch_ce,
    }
    if name in fixed:
        return fixed[name]
    if name == "compile":
        # A fresh static-shape compile per cell: no recompile limit falls back to eager.
        torch._dynamo.reset()
        return torch.compile(_torch_ce, dynamic=False)
    if name == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss()
    raise ValueError(f"unknown provider {name!r}")


def available_providers(requested: Iterable[str], on_cuda: bool) -> tuple[list[str], list[str]]:
    """(providers to run, notes on the ones left out); SystemExit for an unknown name."""
    run, notes = [], []
    for name in requested:
        if name not in ALL_PROVIDERS:
            raise SystemExit(f"unknown provider {name!r}; choose from {', '.join(ALL_PROVIDERS)}")
        if name == "liger" and (not on_cuda or liger_version() is None):
            why = "no CUDA device" if not on_cuda else "liger_kernel not importable"
            notes.append(f"liger skipped: {why}")
            continue
        if name == "fusedce_gluon" and (why := gluon_available(on_cuda)):
            notes.append(f"fusedce_gluon skipped: {why}")
            continue
        run.append(name)
    return run, notes


def backend_label(name: str, logits: torch.Tensor) -> str | None:
    """Which kernel a fusedce provider ran on these logits (None for the rivals)."""
    if not name.startswith("fusedce"):
        return None
    if name == "fusedce_gluon":
        return "gluon"
    return "triton" if fusedce.uses_triton(logits) else "torch fallback"


def make_step(loss_fn: LossFn, mode: str) -> Step:
    """One benchmark step on (logits (N, V), target (N,)): (loss, None) for ``fwd``, (loss,
    d loss / d logits (N, V)) for ``fwd_bwd``."""
    if mode == "fwd":

        def step(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
            with torch.no_grad():
                return loss_fn(x, t), None

    else:

        def step(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
            loss = loss_fn(x, t)
            (grad,) = torch.autograd.grad(loss, x)
            return loss, grad

    return step
