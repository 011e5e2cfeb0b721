"""What the data modules share: argument checks, split sizes and the data loaders."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler, TensorDataset


def ignore_sigint(worker_id: int) -> None:
    """A data loader worker's ``worker_init_fn``: Ctrl-C is the main process's to handle.

    A terminal's Ctrl-C reaches every process of its group; a worker that took it would exit,
    and the main process, which stops at the end of the batch in flight
    (``lightning_modules.interrupt``), would then fail waiting for the worker's next batch
    instead of shutting down. The main process still stops the workers when it ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_positive_int(name: str, value: int) -> None:
    """Raises ``ValueError`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_fraction(name: str, value: float, allow_zero: bool = False) -> None:
    """Raises ``ValueError`` unless ``0 < value < 1`` (``0 <= value < 1`` with ``allow_zero``)."""
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value < 1.0):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def split_sizes(
    num_samples: int, val_fraction: float, test_fraction: float
) -> tuple[int, int, int]:
    """Sizes ``(train, val, test)`` of a split of ``num_samples`` items.

    Raises:
        ValueError: If the fractions leave a split empty (val or train), or sum to >= 1.
    """
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    n_val = round(num_samples * val_fraction)
    n_test = round(num_samples * test_fraction)
    n_train = num_samples - n_val - n_test
    if n_val < 1 or n_train < 1 or (test_fraction > 0 and n_test < 1):
        raise ValueError(
            f"num_samples={num_samples} is too small for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: got train/val/test sizes {n_train}/{n_val}/{n_test}"
        )
    return n_train, n_val, n_test


class EpochShuffle(Sampler[int]):
    """A random order of ``range(n)`` that is a function of ``(seed, epoch)`` alone.

    Lightning calls `set_epoch` at the start of every training epoch, so a fit resumed from a
    checkpoint draws the same batches as an uninterrupted one (a ``shuffle=True`` loader would
    draw its order from the global generator, whose state a checkpoint does not restore at the
    right moment).

    Args:
        n: Number of items.
        seed: Seed of epoch 0's order (epoch ``e`` uses ``seed + e``).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class SplitDataModule(LightningDataModule):
    """Data loaders over train / val / test ``TensorDataset`` splits built by ``setup``.

    Subclasses set ``self.sizes`` (train, val, test), ``self.batch_size`` and the
    hyperparameters ``num_workers`` and ``pin_memory``, and fill ``train_set``, ``val_set`` and
    ``test_set`` in ``setup``. Their class docstrings give the shapes of a batch.
    """

    train_set: TensorDataset | None = None
    val_set: TensorDataset | None = None
    test_set: TensorDataset | None = None

    def _init_split(
        self,
        num_samples: int,
        val_fraction: float,
        test_fraction: float,
        batch_size: int,
        num_workers: int,
    ) -> None:
        """Checks the arguments every split module shares; sets ``sizes`` and ``batch_size``."""
        check_positive_int("num_samples", num_samples)
        check_positive_int("batch_size", batch_size)
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction, allow_zero=True)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.sizes = split_sizes(num_samples, val_fraction, test_fraction)
        self.batch_size = batch_size

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() first")
        # The order and the workers' random state come from the random seed that
        # `seed_everything` set, not from the global generator's current state (`EpochShuffle`).
        seed = torch.initial_seed() % 2**63
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), seed) if shuffle else None,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.num_workers > 0,
            worker_init_fn=ignore_sigint,
            generator=torch.Generator().manual_seed(seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: a new order each epoch (`EpochShuffle`)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in a fixed order."""
        if self.sizes[2] == 0:
            raise ValueError("test_fraction is 0: there is no test split")
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split (the validation split if there is none)."""
        return self._loader(self.test_set if self.sizes[2] else self.val_set, shuffle=False)
