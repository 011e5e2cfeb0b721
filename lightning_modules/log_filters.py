"""Filters for the third-party messages that every training run would print and that say
nothing about the run (matched narrowly, by their text)."""

from __future__ import annotations

import logging
import warnings

_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*The anonymous setting has no effect.*",
    # LightningCLI warns when both `args` and sys.argv are given; train.py's args ARE sys.argv
    # (plus the default config).
    r".*LightningCLI's args parameter is intended.*",
)


class DropTips(logging.Filter):
    """Drops Lightning's advertising tips (``💡 Tip: ...``) from its log."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a tip."""
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Installs the filters (once; calling again adds nothing)."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
