"""How many threads torch's CPU operators use in a ``train.py`` run (``--run.threads``).

torch's default is one intra-op thread per core. That pays off for large matrix products; for a
small model every product is a few microseconds of work, and splitting it across threads costs
more in synchronisation than it saves, worst of all on a machine whose cores are busy with other
processes (the default curve-task run, 4.5 K parameters, takes twice as long on 2 threads as on
1 on a busy 2-core machine; docs/TRAINING.md has the times).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from .errors import TrainError

# Below this many parameters a model's products are too small to share out: one thread.
SMALL_MODEL_PARAMS = 1_000_000


def choose_threads(requested: int | None, model: nn.Module) -> tuple[int, str]:
    """The intra-op thread count for a run and why it was chosen.

    Args:
        requested: ``--run.threads`` (None: choose from the model's size).
        model: The model the run trains or evaluates.

    Returns:
        ``(threads, reason)``; the reason is a short phrase for the run summary.

    Raises:
        TrainError: ``requested`` is below 1.
    """
    if requested is not None:
        if requested < 1:
            raise TrainError(f"--run.threads {requested}: must be at least 1")
        return requested, "--run.threads"
    params = sum(p.numel() for p in model.parameters())
    if params < SMALL_MODEL_PARAMS:
        return 1, f"a small model, {params:,} parameters; --run.threads N to change"
    return torch.get_num_threads(), "torch's default; --run.threads N to change"


def set_threads(requested: int | None, model: nn.Module) -> str:
    """Sets torch's intra-op thread count for the run; returns the summary line's text.

    Args:
        requested: ``--run.threads`` (None: choose from the model's size).
        model: The model the run trains or evaluates.
    """
    threads, reason = choose_threads(requested, model)
    torch.set_num_threads(threads)
    return f"{threads} ({reason})"


class KeepThreads(Callback):
    """Sets the run's thread count again in every process once the trainer has launched them.

    Lightning's DDP launchers set torch's threads to cores / processes (unless
    ``OMP_NUM_THREADS`` is set) after `set_threads` ran; this puts the run's count back, so the
    summary's ``threads:`` line holds under DDP too.

    Args:
        threads: The intra-op thread count (`set_threads`' choice).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Sets torch's intra-op thread count (every process runs it after the launch)."""
        torch.set_num_threads(self.threads)
