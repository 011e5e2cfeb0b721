"""The providers: what a cell times. Each is a loss function of (logits (N, V), target (N,))
returning the mean loss (a 0-dim tensor); ``make_step`` wraps it into forward or
forward + backward.

The ``EXTRAS`` providers time fusedce's one-pass extras (logit scale, softcap, z-loss, token
weights, stats) against the plain ``fusedce`` call in the same cell; each names its options in an
``Extras``, from which the float64 reference of its loss is computed too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import fusedce
from fusedce.index_check import target_check_enabled


@dataclass(frozen=True)
class Extras:
    """The one-pass extras a provider turns on (``fusedce.cross_entropy``'s keyword arguments;
    ``token_weight`` True means the cell's (N,) token weights, see ``token_weights``)."""

    logit_scale: float = 1.0
    softcap: float | None = None
    z_loss: float = 0.0
    token_weight: bool = False
    return_stats: bool = False

    def text(self) -> str:
        """The options as call keywords, for reports."""
        parts = [f"logit_scale={self.logit_scale}"] if self.logit_scale != 1.0 else []
        parts += [f"softcap={self.softcap}"] if self.softcap is not None else []
        parts += [f"z_loss={self.z_loss}"] if self.z_loss else []
        parts += ["token_weight=w"] if self.token_weight else []
        parts += ["return_stats=True"] if self.return_stats else []
        return ", ".join(parts) or "none"


PLAIN = Extras()
# Provider -> the extras it turns on; "extras / plain" etc. in the report = its ms / fusedce ms.
EXTRAS: dict[str, Extras] = {
    # Gemma-style softcap and PaLM's z-loss, with the logged stats: a typical LLM training call.
    "fusedce_extras": Extras(softcap=30.0, z_loss=1e-4, return_stats=True),
    # Per-token loss weights alone (one more (N,) read, and their value check).
    "fusedce_token_weight": Extras(token_weight=True),
    # Every extra at once.
    "fusedce_all": Extras(
        logit_scale=0.5, softcap=30.0, z_loss=1e-4, token_weight=True, return_stats=True
    ),
}
ALL_PROVIDERS = (
    "fusedce",
    "fusedce_inplace",
    "fusedce_nocheck",
    *EXTRAS,
    "eager",
    "compile",
    "liger",
)
DEFAULT_PROVIDERS = ALL_PROVIDERS
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


def token_weights(target: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The cell's token weights: (N,) float32 uniform in [0, 1) on the target's device, from
    ``seed`` (the providers and the float64 reference use the same ones)."""
    gen = torch.Generator(device=target.device).manual_seed(seed + 1)
    return torch.rand(target.shape, generator=gen, device=target.device, dtype=torch.float32)


def _with_extras(extras: Extras, weights: torch.Tensor | None) -> LossFn:
    kwargs: dict[str, Any] = {
        "logit_scale": extras.logit_scale,
        "softcap": extras.softcap,
        "z_loss": extras.z_loss,
        "return_stats": extras.return_stats,
    }
    if extras.token_weight:
        if weights is None:
            raise ValueError("a token_weight provider needs the cell's token weights")
        kwargs["token_weight"] = weights

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = fusedce.cross_entropy(logits, target, **kwargs)
        return out[0] if extras.return_stats else out  # the stats are computed, not used

    return loss_fn


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


def make_loss_fn(name: str, token_weight: torch.Tensor | None = None) -> LossFn:
    """The loss function of a provider (a fresh torch.compile for ``compile``).

    Args:
        name: a provider of ``ALL_PROVIDERS``.
        token_weight: (N,) token weights, for the ``EXTRAS`` providers that use them.
    """
    fixed: dict[str, LossFn] = {
        "fusedce": _fused,
        "fusedce_inplace": _fused_inplace,
        "fusedce_nocheck": _fused_nocheck,
        "eager": _torch_ce,
    }
    if name in fixed:
        return fixed[name]
    if name in EXTRAS:
        return _with_extras(EXTRAS[name], token_weight)
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
        run.append(name)
    return run, notes


def backend_label(name: str, logits: torch.Tensor) -> str | None:
    """Which kernel a fusedce provider ran on these logits (None for the rivals)."""
    if not name.startswith("fusedce"):
        return None
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
