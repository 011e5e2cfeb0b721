"""When to stop: the ``--max-seconds`` budget between cells, and SIGTERM (from ``timeout``)
turned into an exception that lets the run write what it measured."""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


class BudgetExceeded(BaseException):
    """Raised by the SIGTERM handler so that a killed run still writes what it measured.

    A BaseException (like KeyboardInterrupt): the per-provider ``except Exception`` must not
    swallow it.
    """


@dataclass
class Budget:
    """Skips the remaining cells when the next one would likely overrun ``max_seconds``."""

    max_seconds: float | None
    start: float = field(default_factory=time.perf_counter)
    durations: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    def allows_next(self) -> bool:
        """Whether the next cell (estimated as the median cell so far) fits."""
        if self.max_seconds is None:
            return True
        guess = statistics.median(self.durations) if self.durations else 0.0
        return self.elapsed() + guess <= self.max_seconds


_STOP: list[str] = []  # set by the SIGTERM handler, checked between providers and cells


def _on_sigterm(signum: int, frame: Any) -> None:
    _STOP.append(f"signal {signum}")
    raise BudgetExceeded(f"signal {signum}")


def check_stop() -> None:
    """Raises BudgetExceeded if a SIGTERM came (in case library code swallowed the first raise)."""
    if _STOP:
        raise BudgetExceeded(_STOP[0])


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises BudgetExceeded inside the block; the previous handler comes back after."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
