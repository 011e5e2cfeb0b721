"""The curve task: points in the unit square, classified against the curve ``x2 = x1**2``."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .common import SplitDataModule


def band_labels(x: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Noise-free labels of points in the unit square.

    The square is cut by the ``num_classes - 1`` scaled curves ``x2 = c_k * x1**2`` with
    ``c_k = 2 * k / num_classes`` for ``k = 1, ..., num_classes - 1``; the label of a point is the
    number of those curves it lies strictly above::

        label(x1, x2) = #{k : x2 > c_k * x1**2}    (an integer in [0, num_classes - 1])

    With ``num_classes == 2`` the only curve is ``c_1 = 1``, i.e. the curve of the curve
    task, ``f(x1) = (x1, x1**2)``: label 1 = above the curve, label 0 = on or below it.

    Args:
        x: Points, shape ``(N, 2)``, columns ``(x1, x2)``.
        num_classes: Number of classes ``K >= 2``.

    Returns:
        Labels, shape ``(N,)``, dtype int64.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    x1, x2 = x[:, 0], x[:, 1]
    scales = torch.arange(1, num_classes, dtype=x.dtype, device=x.device) * (2.0 / num_classes)
    return (x2[:, None] > scales[None, :] * (x1 * x1)[:, None]).sum(dim=1).long()


def band_boundaries(num_classes: int = 2) -> list[float]:
    """Scale factors ``c_k`` of the class boundaries ``x2 = c_k * x1**2`` (see `band_labels`)."""
    return [2.0 * k / num_classes for k in range(1, num_classes)]


class CurveDataModule(SplitDataModule):
    """Points ``(x1, x2)`` drawn uniformly from the unit square, labelled against ``x2 = x1**2``.

    The curve task as a well-posed classification: ``x1 ~ Uniform[0, 1]`` and ``x2 ~ Uniform[0, 1]``
    independently; the class says whether the point lies above the curve ``f(x1) = (x1, x1**2)``.
    With ``num_classes = K > 2`` the square is split into ``K`` bands by the curves
    ``x2 = c_k * x1**2``, ``c_k = 2k/K`` for ``k = 1..K-1``, and the label is the number of those
    curves the point lies above (see `band_labels`). Bands are not equally large; the curves with
    ``c_k > 1`` leave the square at ``x1 = 1/sqrt(c_k)``.

    Label noise: with probability ``label_noise`` a *training* label is replaced by a class drawn
    uniformly from the other ``K - 1`` classes (so ``label_noise`` is the expected fraction of
    wrong training labels). Validation and test labels stay clean, so their accuracy measures
    how well the true boundary was learned.

    The data are generated once from ``seed`` (independent of the global seed) and split at random
    into train / val / test; the same arguments always give the same tensors and splits.

    Batches are ``(x, y)`` with ``x`` of shape ``(B, 2)`` float32 and ``y`` of shape ``(B,)`` int64.

    Args:
        num_samples: Total number of points (train + val + test).
        val_fraction: Fraction of points in the validation split, in (0, 1).
        test_fraction: Fraction of points in the test split, in [0, 1).
        num_classes: Number of classes ``K >= 2``.
        label_noise: Probability of replacing a training label by a wrong one, in [0, 1).
        batch_size: Training batch size (evaluation uses the same).
        num_workers: DataLoader worker processes.
        seed: Seed of the data generator and of the split.
        pin_memory: Pin host memory of the batches (useful on GPU).
    """

    in_features: int = 2

    def __init__(
        self,
        num_samples: int = 20_000,
        val_fraction: float = 0.2,
        test_fraction: float = 0.1,
        num_classes: int = 2,
        label_noise: float = 0.0,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self._init_split(num_samples, val_fraction, test_fraction, batch_size, num_workers)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
        self.save_hyperparameters()
        self.num_classes = num_classes

    def band_boundaries(self) -> list[float]:
        """Scale factors ``c_k`` of the true class boundaries ``x2 = c_k * x1**2``."""
        return band_boundaries(self.num_classes)

    def generate(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Generates all splits deterministically from ``seed``.

        Returns:
            ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; ``x`` of shape ``(n, 2)``,
            ``y`` of shape ``(n,)``. Training labels include the label noise.
        """
        hp = self.hparams
        gen = torch.Generator().manual_seed(hp.seed)
        x = torch.rand(hp.num_samples, 2, generator=gen)
        y = band_labels(x, hp.num_classes)
        perm = torch.randperm(hp.num_samples, generator=gen)
        n_train, n_val, _ = self.sizes
        idx = {
            "train": perm[:n_train],
            "val": perm[n_train : n_train + n_val],
            "test": perm[n_train + n_val :],
        }
        out = {name: (x[i], y[i]) for name, i in idx.items()}
        if hp.label_noise > 0:
            xt, yt = out["train"]
            flip = torch.rand(len(yt), generator=gen) < hp.label_noise
            shift = torch.randint(1, hp.num_classes, (len(yt),), generator=gen)
            yt = torch.where(flip, (yt + shift) % hp.num_classes, yt)
            out["train"] = (xt, yt)
        return out

    def setup(self, stage: str | None = None) -> None:
        """Builds the datasets (idempotent)."""
        if self.train_set is None:
            splits = self.generate()
            self.train_set = TensorDataset(*splits["train"])
            self.val_set = TensorDataset(*splits["val"])
            self.test_set = TensorDataset(*splits["test"])
