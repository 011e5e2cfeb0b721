"""The trial side of ``train.py tune``: what a ``train.py fit`` run does when it is a trial.

``tune`` starts each trial as ``train.py fit <flags>`` with the environment variable
`TRIAL_ENV` describing the trial (study storage and name, trial number, metric, pruner). Then
`trial_callbacks` adds a `TrialReporter` to the run's callbacks: after every validation it
reports the metric to the study, stops the run when the pruner says so or when the loss or
the metric is not finite, and records why in the trial's user attributes. Without the
variable, ``fit`` is unchanged. Storage and pruner are built here for both sides
(`open_storage`, `make_pruner`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

TRIAL_ENV = "_FUSEDCE_TUNE_TRIAL"

# Seconds between the heartbeats of a running trial in an RDB storage, and after how long
# without one the trial counts as lost (its study process died).
HEARTBEAT_INTERVAL = 30
HEARTBEAT_GRACE = 120

# Losses whose non-finite value means the run diverged (when logged).
_LOSSES = ("train/loss", "val/loss")


def open_storage(url: str, failed_trial_callback: Any = None) -> Any:
    """The optuna storage for ``url``: an RDB URL (``sqlite:///f.db``, ``postgresql://...``,
    ``mysql://...``; with heartbeats, so that the trials of a dead process are failed) or the
    path of a journal file (optuna's `JournalFileBackend`)."""
    import optuna

    if "://" in url:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            grace_period=HEARTBEAT_GRACE,
            failed_trial_callback=failed_trial_callback,
        )
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(url))


def make_pruner(name: str, max_epochs: int | None) -> Any:
    """The pruner for ``--tune.pruner``: ``median``, ``hyperband`` or ``none``.

    ``median`` = optuna's `MedianPruner` that waits for 5 finished trials and prunes from the
    second validation on; ``hyperband`` runs its brackets from 1 epoch up to ``max_epochs``.
    """
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "hyperband":
        top = max_epochs if max_epochs and max_epochs > 0 else "auto"
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=top)
    return optuna.pruners.NopPruner()


def trial_callbacks(subcommand: str) -> list[Callback]:
    """``[TrialReporter(...)]`` in a ``fit`` that ``tune`` started as a trial, else ``[]``."""
    spec = os.environ.get(TRIAL_ENV)
    if not spec or subcommand != "fit":
        return []
    return [TrialReporter(**json.loads(spec))]


class TrialReporter(Callback):
    """Reports a trial's validation metric to its optuna study, prunes and detects divergence.

    After every validation (not the sanity check), rank 0 reads ``metric`` from the trainer's
    metrics and:

    * ``metric``, ``train/loss`` or ``val/loss`` not finite: sets the trial's user attribute
      ``diverged`` (which value, which epoch) and stops the run;
    * ``metric`` not logged: sets ``missing_metric`` (the logged names) and stops;
    * else reports it at step = epoch; if the study's pruner prunes the trial, sets
      ``pruned_at_epoch`` and stops the run.

    An exception that ends the run is recorded as ``error``.

    Stopping is ``trainer.should_stop``: the run ends normally (metrics file, checkpoints,
    W&B run closed) and ``tune`` reads the attributes. The decision is broadcast to all ranks.
    At fit start the trial's parameters go into the W&B run's config (key ``tune``). When the
    process that started the trial is gone, the run stops too.

    Args:
        storage: The study's storage (`open_storage`).
        study: The study's name.
        trial: The trial's number.
        metric: The validation metric reported (e.g. ``val/acc``).
        pruner: ``median``, ``hyperband`` or ``none`` (`make_pruner`).
        max_epochs: ``trainer.max_epochs`` (the hyperband pruner's largest budget).
        params: The trial's parameters (for the W&B config).
        parent_pid: The process id of ``tune``.
    """

    def __init__(
        self,
        storage: str,
        study: str,
        trial: int,
        metric: str,
        pruner: str = "median",
        max_epochs: int | None = None,
        params: dict[str, Any] | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.storage_url = storage
        self.study_name = study
        self.number = trial
        self.metric = metric
        self.pruner_name = pruner
        self.max_epochs = max_epochs
        self.params = dict(params or {})
        self.parent_pid = parent_pid
        self._study: Any = None
        self._storage: Any = None
        self._trial_id: int | None = None
        # The process that tune started (not its DDP workers) watches tune's process.
        self._watch_parent = parent_pid is not None and os.getppid() == parent_pid

    def _connect(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._storage = storage = open_storage(self.storage_url)
        self._study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=make_pruner(self.pruner_name, self.max_epochs),
        )
        study_id = storage.get_study_id_from_name(self.study_name)
        self._trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)

    def _set(self, key: str, value: Any) -> None:
        self._storage.set_trial_user_attr(self._trial_id, key, value)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._connect()
        tune = {"study": self.study_name, "trial": self.number, "params": self.params}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"tune": tune}, allow_val_change=True)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._watch_parent and os.getppid() != self.parent_pid:
            trainer.should_stop = True  # tune is gone: nobody reads this trial's result

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Records why the run failed (attribute ``error``); a signal is not a failure."""
        if isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        if type(exception).__name__ == "SIGTERMException":
            return
        with contextlib.suppress(Exception):  # the study's storage may be what failed
            if self._study is None:
                self._connect()
            first = (str(exception).strip().splitlines() or [""])[0]
            self._set("error", f"{type(exception).__name__}: {first}"[:500])

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            stop = self._report(trainer)
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            trainer.should_stop = True

    def _report(self, trainer: Trainer) -> bool:
        """Reports this epoch's metric; True when the run should stop."""
        if self._study is None:
            self._connect()
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch
        for key in (self.metric, *_LOSSES):
            if key in metrics and not math.isfinite(float(metrics[key])):
                self._set("diverged", f"{key} = {float(metrics[key])} at epoch {epoch}")
                return True
        if self.metric not in metrics:
            self._set("missing_metric", sorted(k for k in metrics if "/" in k))
            return True
        self._storage.set_trial_intermediate_value(
            self._trial_id, epoch, float(metrics[self.metric])
        )
        frozen = self._storage.get_trial(self._trial_id)
        if self._study.pruner.prune(self._study, frozen):
            self._set("pruned_at_epoch", epoch)
            return True
        return False
