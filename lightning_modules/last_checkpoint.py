"""``last.ckpt`` as the true last state of a fit: `LastCheckpoint`."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` at every validation end of a fit, at the end of the fit, and when a
    signal (SIGINT / SIGTERM) stops it mid-epoch (single-process runs).

    Lightning's `ModelCheckpoint` (2.6) writes ``last.ckpt`` only at a step where it also wrote
    a top-k checkpoint, so its ``last.ckpt`` is the best epoch's state, and it never writes one
    at the end of the fit. This callback takes ``save_last: true`` over from every
    `ModelCheckpoint` of the trainer (for the fit; restored at teardown) and writes
    ``<dirpath>/last.ckpt`` itself, after the `ModelCheckpoint` callbacks have updated their
    state (Lightning runs checkpoint callbacks last, in their order), so that resuming from it
    continues exactly where the run stopped. It writes nothing when the fit ends in an error
    (a diverged run keeps its last finite ``last.ckpt``).

    Attributes:
        saved: ``(path, global step)`` of the last ``last.ckpt`` written, or None.
    """

    def __init__(self) -> None:
        """Takes over no `ModelCheckpoint` until the fit starts."""
        self._owners: list[ModelCheckpoint] = []
        self.saved: tuple[str, int] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Takes ``save_last`` over from the trainer's `ModelCheckpoint` callbacks (fit only)."""
        if stage != "fit":
            return
        self._owners = [
            cb
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.save_last is True
        ]
        for cb in self._owners:
            cb.save_last = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Gives ``save_last`` back to the callbacks it took it from."""
        for cb in self._owners:
            cb.save_last = True
        self._owners = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Writes ``last.ckpt`` after each validation of the fit (not the sanity check)."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Writes ``last.ckpt`` with the state at the end of the fit."""
        self.save(trainer, force=True)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Writes ``last.ckpt`` where a signal stopped a single-process fit."""
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if trainer.world_size > 1 or trainer.sanity_checking:
            return  # saving is collective, and the other ranks may not have stopped
        self.save(trainer)

    def save(self, trainer: Trainer, force: bool = False) -> None:
        """Writes ``last.ckpt`` for every `ModelCheckpoint` taken over.

        Args:
            trainer: The fitting trainer.
            force: Write even where ``last.ckpt`` holds this global step already (the end of
                the fit: the epoch has ended since, the schedulers have stepped).
        """
        step = trainer.global_step
        if step == 0 or (not force and self.saved is not None and self.saved[1] == step):
            return
        for cb in self._owners:
            if not cb.dirpath:
                continue
            metrics = {
                **trainer.callback_metrics,
                "epoch": torch.tensor(trainer.current_epoch),
                "step": torch.tensor(step),
            }
            name = cb.format_checkpoint_name(metrics, cb.CHECKPOINT_NAME_LAST)
            path = os.path.join(cb.dirpath, os.path.basename(name))
            cb.last_model_path = path  # before saving: the callback's state is in the file
            trainer.save_checkpoint(path, cb.save_weights_only)
            self.saved = (path, step)
