"""Ctrl-C that stops a fit at the next batch boundary: `DeferredInterrupt`."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback


class DeferredInterrupt(Callback):
    """Turns the first SIGINT of a single-process fit into a ``KeyboardInterrupt`` raised at the
    next batch end (training or validation), the way Lightning turns SIGTERM into a
    ``SIGTERMException`` at its batch boundaries.

    Python raises ``KeyboardInterrupt`` at whatever bytecode runs when the signal arrives; where
    that is a finalizer (``__del__``, a weakref callback, a generator closing), the exception is
    printed as "ignored" and lost, and the run goes on. Here the handler only records the
    signal, so it cannot be lost, and the hooks raise it where Lightning's graceful shutdown
    (``on_exception``: ``metrics.json``, ``last.ckpt``) expects it; one that arrives after the
    last batch end is raised when the fit tears down. The handler is installed when training
    starts (a Ctrl-C during the sanity check is Python's as before; an ignored SIGINT stays
    ignored) and the previous one restored when the fit ends; a second SIGINT before a batch end
    goes to the previous handler at once (by default: ``KeyboardInterrupt`` wherever the run
    is, e.g. stuck in a data loader). The data modules' loader workers ignore SIGINT
    (``datamodules.common.ignore_sigint``), so that they are there for the batch in flight.
    Runs on several processes keep Python's own handling: raised at different batches on
    different ranks, the stop would leave a rank waiting in a collective.

    Attributes:
        pending: A SIGINT arrived and is waiting for the next batch end.
    """

    def __init__(self) -> None:
        """Installs nothing until the fit starts."""
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C is not deferred

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Installs the handler for a single-process fit in the main thread.

        Installed here, after Lightning's signal connector has recorded the handlers it puts
        back when the fit ends (however it ends), so that a fit never leaves this one behind.
        """
        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return  # several ranks: see the class; signal.signal works in the main thread only
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):
            return  # ignored (nohup, a background job), or a handler Python cannot put back
        self.pending = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def _restore(self) -> None:
        if self._installed and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self._installed = False

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Restores the previous handler (an error or the interrupt ends the fit)."""
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Restores the previous handler (where this one is still installed), then raises a
        SIGINT that arrived after the last batch end (the fit has ended; the signal is not
        lost: the run reports it as interrupted)."""
        self._restore()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        """Raises the recorded SIGINT."""
        self._raise_pending()

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        """Raises the recorded SIGINT."""
        self._raise_pending()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Raises the recorded SIGINT (one that arrived after the epoch's last batch end)."""
        self._raise_pending()
