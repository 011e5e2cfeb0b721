"""Stopping a fit that diverged: `StopOnDivergence`."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from .errors import RunDiverged
from .last_checkpoint import LastCheckpoint


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # this rank's part of a DTensor


class StopOnDivergence(Callback):
    """Ends a fit with `RunDiverged` at the first non-finite training loss, gradient norm,
    weight or validation loss.

    After every training step it checks the step's loss, the gradients' total 2-norm (before
    clipping) and the weights, with one host synchronisation (and, with several processes,
    one all-reduce of the verdict, so that all ranks stop together); after every validation of
    the fit it checks ``val/loss``, before any checkpoint callback can save the state.
    The error names the metric, the step and the last checkpoint written before it
    (`LastCheckpoint`); `RunSummary` records ``"status": "diverged"``.
    """

    def __init__(self) -> None:
        """No gradient norm seen yet."""
        self._grad_norm: Tensor | None = None

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keeps the gradients' total 2-norm (this rank's part; no synchronisation)."""
        norms = [
            torch.linalg.vector_norm(_local(p.grad).detach().float())
            for p in pl_module.parameters()
            if p.grad is not None
        ]
        self._grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stops the fit when the step's loss, gradient norm or weights are not finite."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        values = {}
        if isinstance(loss, Tensor):
            values["train/loss"] = loss.detach().float().reshape(())
        if self._grad_norm is not None:
            values["train/grad_norm"] = self._grad_norm
        weights = [torch.isfinite(_local(p.detach())).all() for p in pl_module.parameters()]
        checks = torch.stack([*(torch.isfinite(v) for v in values.values()), *weights])
        finite = bool(checks.all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        named = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
        what = (
            ", ".join(f"{k} is {v}" for k, v in named.items())
            or ("the weights are not finite" if not bool(torch.stack(weights).all()) else "")
            or "a loss, gradient or weight is not finite on another rank"
        )
        self._stop(trainer, what)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stops the fit when ``val/loss`` is not finite (before checkpoints are saved)."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not math.isfinite(float(value)):
            self._stop(trainer, f"val/loss is {float(value)}")

    def _stop(self, trainer: Trainer, what: str) -> None:
        last = next(
            (cb.saved for cb in trainer.callbacks if isinstance(cb, LastCheckpoint) and cb.saved),
            None,
        )
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if last:
            kept = f"last finite checkpoint: {last[0]} (step {last[1]})"
        elif best:
            kept = f"last finite checkpoint: {best}"
        else:
            kept = "no checkpoint was written before it"
        raise RunDiverged(
            f"the run diverged at step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"{what}; {kept}"
        )
