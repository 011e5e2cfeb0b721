"""The errors that end a training run with one line on stderr instead of a traceback.

``train.py`` prints ``train.py <subcommand>: error: <message>`` and exits with the error's
``exit_code``: 2 for a bad setting or file (`TrainError`, `CheckpointWriteError`), 3 for a run
that diverged (`RunDiverged`).
"""

from __future__ import annotations


class TrainError(Exception):
    """A setting, or the state of a file it names, that the run cannot go on with."""

    exit_code = 2


class CheckpointWriteError(TrainError):
    """A checkpoint could not be written (a full disk); the previous one is left as it was."""


class RunDiverged(TrainError):
    """A non-finite loss, gradient norm, weight or validation loss stopped the run."""

    exit_code = 3
