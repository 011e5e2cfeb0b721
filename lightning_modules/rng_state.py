"""torch's random number generator states in every checkpoint, so that a resumed fit draws the
same numbers (dropout masks) as an uninterrupted one: `RngStateInCheckpoint`. (The batch order
does not depend on them: `fusedce.datamodules.EpochShuffle`.)"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

RNG_KEY = "fusedce_rng"  # checkpoint entry with the generators' states


def capture_rng_states() -> dict[str, Any]:
    """The states of torch's CPU generator and, where CUDA is in use, its CUDA generators."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Sets the generators to ``states`` (from `capture_rng_states`); CUDA states only where
    the device count is the same."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RngStateInCheckpoint(Callback):
    """Stores torch's generator states in every checkpoint and, when a fit resumes from one,
    sets them back as training starts (after the sanity check, which could draw numbers too).

    The checkpoint holds the states of the process that wrote it (rank 0); every rank of a
    resumed distributed fit gets those.
    """

    def __init__(self) -> None:
        """Nothing to restore yet."""
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Adds ``checkpoint["fusedce_rng"]``."""
        checkpoint[RNG_KEY] = capture_rng_states()

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keeps the checkpoint's states for `on_train_start` (none: nothing to restore)."""
        self._pending = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sets the generators to the resumed checkpoint's states."""
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None
