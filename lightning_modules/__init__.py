"""Lightning modules, networks and callbacks of the training stack.

The pieces that ``train.py`` assembles (run options and directory, W&B set-up, checkpoint
handling, the report) are modules of this package too, imported by name where used.
"""

from .callbacks import (
    DecisionBoundaryPlot,
    LastCheckpointOnInterrupt,
    PredictionWriter,
    RunSummary,
    batch_size,
)
from .classifier import Classifier
from .networks import MLP

__all__ = [
    "MLP",
    "Classifier",
    "DecisionBoundaryPlot",
    "LastCheckpointOnInterrupt",
    "PredictionWriter",
    "RunSummary",
    "batch_size",
]
