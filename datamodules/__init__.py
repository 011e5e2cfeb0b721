"""Data modules: the seed's curve task and a large-vocabulary teacher task."""

from datamodules.curve import CurveDataModule, band_boundaries, band_labels
from datamodules.teacher import TeacherDataModule

__all__ = ["CurveDataModule", "TeacherDataModule", "band_boundaries", "band_labels"]
