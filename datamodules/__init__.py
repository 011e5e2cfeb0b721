"""Data modules: the curve task and a large-vocabulary teacher task."""

from .common import EpochShuffle
from .curve import CurveDataModule, band_boundaries, band_labels
from .teacher import TeacherDataModule

__all__ = ["CurveDataModule", "EpochShuffle", "TeacherDataModule", "band_boundaries", "band_labels"]
