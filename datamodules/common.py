"""Validation helpers shared by the data modules."""

from __future__ import annotations


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
