"""Progress for logs that are not a terminal: one line per training epoch.

A live progress bar redraws itself in place; written to a file or a pipe (a cluster job's log,
CI) it becomes either a wall of carriage returns or, with Rich, one final frame wrapped over
several lines. `EpochLines` prints one plain line when each epoch (and its validation) ends.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

# The metrics an epoch line shows, in this order, when the run logged them.
SHOWN = ("train/loss", "val/loss", "val/loss_gap", "val/acc", "val/acc_best")


def epoch_line(
    epoch: int, max_epochs: int, batches: int, seconds: float, metrics: dict[str, Any]
) -> str:
    """``Epoch 3/24: 110 batches in 1.9 s  train/loss 0.1234  val/loss 0.0456 ...``.

    Epochs are counted from 0, as the progress bar, the W&B ``epoch`` and the checkpoint names
    count them; ``max_epochs`` < 0 (no limit) shows ``?`` as the last epoch.

    Args:
        epoch: The epoch that ended (from 0).
        max_epochs: ``trainer.max_epochs``.
        batches: Training batches the epoch ran.
        seconds: Wall time of the epoch, validation included.
        metrics: The logged metrics (tensors or numbers).
    """
    last = str(max_epochs - 1) if max_epochs is not None and max_epochs >= 0 else "?"
    parts = [f"Epoch {epoch}/{last}: {batches} batches in {seconds:.1f} s"]
    for key in SHOWN:
        if key in metrics:
            value = float(metrics[key])
            parts.append(f"{key} {value:.4f}" if math.isfinite(value) else f"{key} {value}")
    return "  ".join(parts)


class EpochLines(ProgressBar):
    """A progress "bar" that prints one line per training epoch (`epoch_line`) and nothing else.

    Args:
        stream: Where the lines go (default: ``sys.stdout`` at the time of printing).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._enabled = True
        self._started = 0.0
        self._batches = 0

    def disable(self) -> None:
        """Called by Lightning on every rank but the first: only one process prints."""
        self._enabled = False

    def enable(self) -> None:
        """Called by Lightning to print again."""
        self._enabled = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Starts the epoch's clock and batch count."""
        self._started, self._batches = time.monotonic(), 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """Counts the batch."""
        self._batches += 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Prints the epoch's line (Lightning runs the epoch's validation before this hook)."""
        if not self._enabled:
            return
        line = epoch_line(
            trainer.current_epoch,
            trainer.max_epochs if trainer.max_epochs is not None else -1,
            self._batches,
            time.monotonic() - self._started,
            dict(trainer.callback_metrics),
        )
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
