"""The callbacks that ``train.py`` adds to the configured ones, and its adjustments to them."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.utilities import rank_zero_warn

from .callbacks import DecisionBoundaryPlot, PredictionWriter, RunSummary
from .checkpoints import RunInfoInCheckpoint
from .divergence import StopOnDivergence
from .epoch_lines import EpochLines
from .interrupt import DeferredInterrupt
from .last_checkpoint import LastCheckpoint
from .rng_state import RngStateInCheckpoint
from .teacher_gap import TeacherGap
from .threads import KeepThreads
from .tune_trial import trial_callbacks


def stack_callbacks(
    subcommand: str, configured: list[Any], opts: dict[str, Any], trainer_cfg: dict[str, Any]
) -> list[Any]:
    """The callbacks of a ``train.py`` trainer: the configured ones and the stack's.

    The stack adds `RunSummary`, `RunInfoInCheckpoint`, `RngStateInCheckpoint` and
    `KeepThreads` (the thread count `threads.set_threads` has just set) always;
    `StopOnDivergence`, `TeacherGap`, `DeferredInterrupt` (Ctrl-C at the next batch end),
    `LastCheckpoint` (where a `ModelCheckpoint` has ``save_last: true``) and (with
    ``--run.plot``) `DecisionBoundaryPlot` to ``fit``;
    `PredictionWriter` to ``predict``; and where a bar is wanted and none is configured, a
    Rich progress bar on a terminal (with ``rich`` installed) or `EpochLines` (one line per
    epoch) elsewhere. A `LearningRateMonitor` is left out (with a warning) when the trainer
    has no logger: it would fail at fit start.

    Args:
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        configured: The instantiated ``trainer.callbacks``.
        opts: The ``--run`` options as a dict.
        trainer_cfg: The instantiated ``trainer`` section (``logger``, ``enable_progress_bar``).
    """
    callbacks: list[Callback] = list(configured)
    if trainer_cfg.get("logger") is False:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        if len(callbacks) < len(configured):
            rank_zero_warn("trainer.logger is false: LearningRateMonitor is left out")
    callbacks += [RunSummary(), RunInfoInCheckpoint(), RngStateInCheckpoint()]
    callbacks.append(KeepThreads(torch.get_num_threads()))
    callbacks += trial_callbacks(subcommand)  # `tune_trial.TrialReporter` in a tune trial
    if subcommand == "fit":
        callbacks += [StopOnDivergence(), TeacherGap(), DeferredInterrupt()]
        if any(isinstance(c, ModelCheckpoint) and c.save_last is True for c in configured):
            callbacks.append(LastCheckpoint())
        if opts.get("plot", True):
            callbacks.append(DecisionBoundaryPlot())
    if subcommand == "predict":
        callbacks.append(PredictionWriter())
    wants_bar = trainer_cfg.get("enable_progress_bar") is not False
    has_bar = any(isinstance(c, ProgressBar) for c in configured)
    if wants_bar and not has_bar:
        if sys.stdout.isatty() and importlib.util.find_spec("rich") is not None:
            from lightning.pytorch.callbacks import RichProgressBar

            callbacks.append(RichProgressBar())
        elif not sys.stdout.isatty():  # a log file or a pipe: a redrawn bar would garble it
            callbacks.append(EpochLines())
    return callbacks


def early_stopping_at_validation_ends(callbacks: Any) -> None:
    """Sets ``check_on_train_epoch_end: false`` on configured `EarlyStopping` callbacks that
    leave it unset.

    Checked at validation ends only, a run that stops mid-epoch (max_steps, max_time) before any
    validation does not fail on the missing metric at its epoch end.

    Args:
        callbacks: The parsed (not yet instantiated) ``trainer.callbacks``; changed in place.
    """
    for cb in callbacks or []:
        if not isinstance(cb, Namespace) or not isinstance(cb.get("init_args"), Namespace):
            continue
        module, _, name = str(cb.get("class_path", "")).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue
        is_early_stopping = isinstance(cls, type) and issubclass(cls, EarlyStopping)
        if is_early_stopping and cb.init_args.get("check_on_train_epoch_end") is None:
            cb.init_args["check_on_train_epoch_end"] = False
