"""``--ckpt_path`` for ``train.py``: reading a checkpoint, reconciling its model settings with
the configured ones, checking that its weights fit the model, and the run information that every
checkpoint carries (run directory, W&B run id)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger

from .checkpoint_io import nonfinite_tensors
from .classifier import Classifier
from .errors import TrainError

CKPT_RUN_KEY = "fusedce_run"  # checkpoint entry with the run directory and W&B run id
# Model hyperparameters that ``train.py`` links from the data module.
LINKED = ("in_features", "num_classes")
# Model hyperparameters that shape the weights: a checkpoint's values cannot be overridden.
ARCHITECTURE = ("hidden_sizes", "activation", "batch_norm", "init")
# Names that select a checkpoint by a rule of Lightning's rather than a file.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


class RunInfoInCheckpoint(Callback):
    """Stores the run directory and W&B run id in every checkpoint (for resuming the W&B run)."""

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        """Adds ``checkpoint["fusedce_run"] = {"run_dir": ..., "wandb_id": ...}``."""
        info: dict[str, Any] = {"run_dir": str(trainer.default_root_dir)}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                info["wandb_id"] = str(logger.version)
        checkpoint[CKPT_RUN_KEY] = info

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        """Starts the top-k of a `ModelCheckpoint` anew where the resumed run writes elsewhere.

        A resumed run has its own run directory, so the checkpoint's top-k list names files of
        another run: `ModelCheckpoint` then keeps only ``best_model_path`` (and warns about it
        on every resume). That is what happens here too, said once in docs/TRAINING.md instead:
        the state is reduced to ``best_model_path`` before the callbacks load theirs (Lightning
        calls every ``on_load_checkpoint`` first).
        """
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key)
            if isinstance(state, dict) and state.get("dirpath", cb.dirpath) != cb.dirpath:
                states[cb.state_key] = {
                    "best_model_path": state.get("best_model_path", ""),
                    "best_model_score": None,
                }


def classifier_params() -> set[str]:
    """The init arguments of `Classifier` (the hyperparameters its checkpoints store)."""
    return set(inspect.signature(Classifier.__init__).parameters) - {"self"}


def read_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """Loads a ``Classifier`` checkpoint (tensors and plain values only) onto the CPU.

    Raises:
        TrainError: No such file, not a checkpoint, the checkpoint of another model, or weights
            that are not finite.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise TrainError(f"--ckpt_path {ckpt_path}: no such file")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise TrainError(
            f"--ckpt_path {ckpt_path}: not a readable checkpoint ({err})".split("\n")[0]
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise TrainError(f"--ckpt_path {ckpt_path}: not a Lightning checkpoint (no state_dict)")
    bad = nonfinite_tensors(ckpt["state_dict"])
    if bad:
        raise TrainError(
            f"--ckpt_path {ckpt_path}: its weights are not finite ({', '.join(bad[:3])}): it "
            "comes from a run that diverged; use an earlier checkpoint"
        )
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    foreign = sorted(set(hparams) - classifier_params())
    if (class_path and not class_path.endswith(".Classifier")) or foreign:
        what = class_path or "a model with hyperparameters " + ", ".join(foreign)
        raise TrainError(
            f"--ckpt_path {ckpt_path}: saved by {what}, not by fusedce.lightning_modules.Classifier"
        )
    return ckpt


def checkpoint_hparams(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model's init arguments stored in ``ckpt`` (without Lightning's bookkeeping keys)."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    for key in ("_instantiator", "_class_path"):
        hparams.pop(key, None)
    return hparams


def reconcile_hparams(
    hparams: dict[str, Any], explicit: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The checkpoint's model settings to apply, after the explicitly configured ones.

    Explicit settings that differ from the checkpoint's win where that is meaningful (loss
    options, dropout, regularisation, scheduler settings) and are refused for the architecture
    (`ARCHITECTURE`): the weights are for the checkpoint's network.

    Args:
        hparams: The checkpoint's model hyperparameters (`checkpoint_hparams`).
        explicit: Model settings given explicitly (flags or ``--config`` files beyond the
            default config) by name.

    Returns:
        The checkpoint's settings that are not overridden, and the line that lists the applied
        overrides (None: none).

    Raises:
        TrainError: An explicit architecture setting differs from the checkpoint's.
    """
    conflicts = {
        key: (explicit[key], hparams[key])
        for key in explicit
        if key in hparams and key not in LINKED and explicit[key] != hparams[key]
    }
    refused = [key for key in conflicts if key in ARCHITECTURE]
    if refused:
        given = ", ".join(
            f"--model.{k} {conflicts[k][0]!r} (checkpoint: {conflicts[k][1]!r})" for k in refused
        )
        raise TrainError(
            f"{given}: the checkpoint's weights are for its own network; drop the "
            "setting (or its --config) to use the checkpoint"
        )
    kept = {k: v for k, v in hparams.items() if k not in conflicts}
    if not conflicts:
        return kept, None
    applied = ", ".join(
        f"--model.{k} {given!r} (checkpoint: {saved!r})" for k, (given, saved) in conflicts.items()
    )
    return kept, f"applied over the checkpoint's settings: {applied}"


def check_fits_model(ckpt: dict[str, Any], model: Classifier) -> None:
    """Refuses a checkpoint whose weights do not fit the instantiated model.

    Raises:
        TrainError: Missing, unexpected or differently shaped weights; the message names the
            ``--data.*`` flags whose linked sizes differ from the checkpoint's.
    """
    state = dict(ckpt["state_dict"])
    model.on_load_checkpoint({"state_dict": state})
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or wrong):
        return
    hp = dict(ckpt.get("hyper_parameters") or {})
    flags = [
        f"--data.{k} {model.hparams[k]} (checkpoint: {hp[k]})"
        for k in LINKED
        if k in hp and hp[k] != model.hparams[k]
    ]
    detail = "; ".join(
        [
            f"size mismatch for {k}: {tuple(state[k].shape)} in the checkpoint, "
            f"{tuple(own[k].shape)} in the model"
            for k in wrong[:2]
        ]
        + ([f"missing {', '.join(missing[:3])}"] if missing else [])
        + ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
    )
    prefix = ", ".join(flags) + ": " if flags else ""
    raise TrainError(f"{prefix}the checkpoint's weights do not fit the model: {detail}")


def explicit_model_values(given: Any, default: Any) -> dict[str, Any]:
    """The model settings in ``given`` that differ from ``default`` (both parsed ``model``
    sections; ``default``: what the parser defaults and the default config give)."""
    out = {}
    for key in classifier_params():
        if given is None or key not in given:
            continue
        value = given[key]
        if default is None or key not in default or value != default[key]:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def resumed_wandb_id(ckpt: dict[str, Any], ckpt_path: str) -> str | None:
    """The W&B run id that a fit resumed from ``ckpt`` continues (None: none recorded)."""
    info = ckpt.get(CKPT_RUN_KEY) or {}
    if info.get("wandb_id"):
        return str(info["wandb_id"])
    # checkpoints written without that entry: <run dir>/checkpoints/x.ckpt, <run dir>/wandb/
    runs = sorted(Path(ckpt_path).resolve().parent.parent.glob("wandb/*run-*-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None
