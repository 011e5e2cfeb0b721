"""Lightning modules, networks and callbacks of the training stack.

The pieces that ``train.py`` assembles (run options and directory, W&B set-up, checkpoint
handling, the report) are modules of this package too, imported by name where used.
"""

from .callbacks import DecisionBoundaryPlot, PredictionWriter, RunSummary, batch_size
from .classifier import Classifier
from .last_checkpoint import LastCheckpoint
from .networks import MLP

# The earlier name of `LastCheckpoint` (which wrote last.ckpt only on SIGINT / SIGTERM).
LastCheckpointOnInterrupt = LastCheckpoint

__all__ = [
    "MLP",
    "Classifier",
    "DecisionBoundaryPlot",
    "LastCheckpoint",
    "LastCheckpointOnInterrupt",
    "PredictionWriter",
    "RunSummary",
    "batch_size",
]
