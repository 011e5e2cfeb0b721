"""Lightning modules and callbacks of the training stack."""

from lightning_modules.callbacks import DecisionBoundaryPlot, PredictionWriter, RunSummary
from lightning_modules.classifier import Classifier

__all__ = ["Classifier", "DecisionBoundaryPlot", "PredictionWriter", "RunSummary"]
