"""``train.py tune``: a hyperparameter search with Optuna whose trials are ordinary ``fit`` runs.

::

    python train.py tune [--config C] --tune.space SPACE.yaml [--tune.trials 20]
        [--tune.timeout S] [--tune.study NAME] [--tune.storage URL] [--tune.metric val/acc]
        [--tune.direction maximize|minimize] [--tune.pruner median|hyperband|none]
        [--tune.sampler tpe|random|grid] [--tune.seed N] [fit flags]

Every trial runs ``python train.py fit <fit flags> <the trial's flags>`` in its own process,
with its own run directory ``<root>/<study>/trial-NNNN`` and its own W&B run (W&B group = the
study's name, the trial's parameters under ``tune`` in the run's config). After every
validation the trial reports ``--tune.metric`` to the study, and the pruner may stop it
(`tune_trial.TrialReporter`); the trial's value is the best value it reported. A trial whose
loss or metric is not finite, or whose process fails, is recorded as failed with its reason;
the study goes on.

The study lives in ``--tune.storage``: by default the journal file
``<root>/<study>/optuna.journal``; an RDB URL (``postgresql://...``, ``mysql://...``,
``sqlite:///...``) lets workers on several machines share it. ``--tune.trials`` is the total
wanted: running the same command again resumes the study and runs only the trials that are
missing, and several processes on one storage share the total. A trial in flight when its
``tune`` process stopped (Ctrl-C, SIGTERM, kill -9) is run again with the same parameters.

It ends by printing the best trial and the ``fit`` command that reproduces it, and writes
into ``<root>/<study>/``: ``study.json`` (every trial), ``best.yaml`` (the best trial's
configuration: ``train.py fit --config best.yaml``) and ``study.png`` (optimisation history
and parameter importances), also logged to a W&B run of the group (job type ``study``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import TrainError
from .search_space import param_flags, space_spec
from .tools import FitMain, command_line, plain
from .tune_setup import Setup, TuneOptions, prepare
from .tune_trial import HEARTBEAT_INTERVAL, TRIAL_ENV, make_pruner, open_storage

_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}
_HOST = socket.gethostname()
# An error of a trial's fit that says it diverged.
_DIVERGED = re.compile(r"\b(nan|inf|non-finite|not finite|diverg\w*)\b", re.IGNORECASE)


# -------------------------------------------------------------------------------- helpers
class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the trial in flight ends cleanly."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), to tell it from a later reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Asks Linux to send the trial SIGTERM when tune dies (even by kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _claim_lock(path: Path) -> Iterator[None]:
    """Serialises "count the trials, then start one" between the tune processes of a machine."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): the rank check still holds
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def counted(trials: list[Any]) -> list[Any]:
    """The trials that count towards ``--tune.trials``: all but the failed ones that are
    retried (a trial in flight when its process stopped) and the surplus ones."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [
        t
        for t in trials
        if not (t.state == TrialState.FAIL and (t.number in retried or t.user_attrs.get("surplus")))
    ]


def _last_error(log: Path) -> str:
    """The line of a trial's log that says why it failed."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line and not line.startswith("wandb:")]
    for line in reversed(lines):
        if ": error: " in line or "Error:" in line or "Exception:" in line:
            return line[:500]
    return lines[-1][:500] if lines else "(empty log)"


# --------------------------------------------------------------------------------- runner
class StudyRunner:
    """Runs the trials of one ``tune`` command until the study has ``--tune.trials``.

    Attributes:
        setup: The checked command line.
        interrupted: ``SIGINT`` / ``SIGTERM`` once a signal stopped this process.
        config_error: Set when a trial shows that the configuration cannot work (the metric
            is never logged): the study stops.
    """

    def __init__(self, setup: Setup) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.setup = setup
        self.interrupted: str | None = None
        self.config_error: str | None = None
        self._current: Any = None  # the trial asked and not told
        setup.study_dir.mkdir(parents=True, exist_ok=True)
        self.storage = open_storage(setup.storage_url, failed_trial_callback=self._retry_lost)
        self.study = self._open_study()
        self.study_id = self.storage.get_study_id_from_name(setup.study_name)
        self.pid, self.pid_start = os.getpid(), _process_start(os.getpid())
        total = setup.opts.trials
        if setup.grid:
            size = math.prod(len(v) for v in setup.grid.values())
            if size < total:
                print(f"tune: the grid has {size} points: the study ends after {size} trials")
                total = size
        self.total = total

    # -- study
    def _open_study(self) -> Any:
        import optuna

        s = self.setup
        identity = {
            "fit_args": s.fit_args,
            "space": space_spec(s.params),
            "metric": s.opts.metric,
            "direction": s.direction,
        }
        try:
            study = optuna.load_study(
                study_name=s.study_name, storage=self.storage, pruner=self._pruner()
            )
        except KeyError:
            study = optuna.create_study(
                study_name=s.study_name,
                storage=self.storage,
                direction=s.direction,
                pruner=self._pruner(),
                load_if_exists=True,
            )
        stored = {k: study.user_attrs[k] for k in identity if k in study.user_attrs}
        for key, value in identity.items():
            if key not in stored:
                study.set_user_attr(key, value)
            elif json.dumps(stored[key], sort_keys=True) != json.dumps(value, sort_keys=True):
                raise TrainError(
                    f"study {s.study_name} ({s.storage_url}) was run with another {key}: "
                    f"{stored[key]!r}; give this search its own --tune.study name"
                )
        study.sampler = self._sampler(0)
        return study

    def _pruner(self) -> Any:
        return make_pruner(self.setup.opts.pruner, self.setup.max_epochs)

    def _sampler(self, offset: int) -> Any:
        import optuna

        seed = self.setup.opts.seed
        seed = None if seed is None else seed + offset
        if self.setup.opts.sampler == "grid":
            return _grid_sampler(self.setup.grid, seed)
        if self.setup.opts.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def trial_id(self, trial: Any) -> int:
        """The storage's id of ``trial`` (an optuna `Trial` or `FrozenTrial`)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def _heartbeat(self, trial: Any) -> None:
        """RDB storages: tells other workers that ``trial`` still runs."""
        if hasattr(self.storage, "record_heartbeat"):
            self.storage.record_heartbeat(self.trial_id(trial))

    def _retry_lost(self, study: Any, trial: Any) -> None:
        """RDB storages: a trial whose process stopped sending heartbeats runs again."""
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})

    def _recover_local(self) -> None:
        """Fails the RUNNING trials of dead tune processes of this machine and runs them
        again (a kill -9 of the whole study: the trial in flight)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = t.user_attrs
            if attrs.get("host") != _HOST or not attrs.get("pid"):
                continue
            if _alive(int(attrs["pid"]), attrs.get("pid_start")):
                continue
            tid = self.trial_id(t)
            reason = f"lost: its tune process ({attrs['pid']}) ended while it ran"
            try:
                self.storage.set_trial_user_attr(tid, "reason", reason)
                self.storage.set_trial_state_values(tid, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue
            self.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            print(f"trial {t.number:>3} {reason}: it runs again", flush=True)

    # -- the loop
    def run(self) -> None:
        """Runs trials until the total is reached, the timeout passes or a signal arrives."""
        deadline = None
        if self.setup.opts.timeout:
            deadline = time.monotonic() + self.setup.opts.timeout
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            while self.config_error is None:
                if deadline is not None and time.monotonic() >= deadline:
                    print("tune: --tune.timeout reached: no new trial", flush=True)
                    break
                started = self._start_trial()
                if started is None:
                    break
                self._run_trial(*started)
        except KeyboardInterrupt:
            self._interrupt("SIGINT")
        except _Terminated:
            self._interrupt("SIGTERM")
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _interrupt(self, name: str) -> None:
        self.interrupted = name
        if self._current is not None:  # stopped between asking and running
            self._tell_interrupted(self._current, name)

    def _start_trial(self) -> tuple[Any, dict[str, Any]] | None:
        """Claims the next trial (None: the study has its total)."""
        from optuna.storages import fail_stale_trials

        with _claim_lock(self.setup.study_dir / ".claim.lock"):
            self._recover_local()
            if "://" in self.setup.storage_url:
                fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            done = len(counted(trials))
            if done >= self.total:
                return None
            if self.setup.opts.seed is not None:
                self.study.sampler = self._sampler(len(trials))
            trial = self.study.ask()
            self._current = trial
            for key, value in (("host", _HOST), ("pid", self.pid), ("pid_start", self.pid_start)):
                trial.set_user_attr(key, value)
            self._heartbeat(trial)
            values = {p.key: p.suggest(trial) for p in self.setup.params}
        # Workers on other machines (RDB storage) may have started trials at the same time:
        # a trial beyond the total gives way.
        before = [
            t for t in counted(self.study.get_trials(deepcopy=False)) if t.number < trial.number
        ]
        if len(before) >= self.total:
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("reason", "surplus: other workers reached the total first")
            self.study.tell(trial, state=_state("FAIL"))
            self._current = None
            return None
        return trial, values

    def _run_trial(self, trial: Any, values: dict[str, Any]) -> None:
        """Runs one trial as ``train.py fit`` and tells the study how it ended."""
        s = self.setup
        run_dir = s.study_dir / f"trial-{trial.number:04d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        fit = s.fit_command(values)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("command", command_line(fit))
        env = {k: v for k, v in os.environ.items() if not k.startswith("_FUSEDCE_")}
        env[TRIAL_ENV] = json.dumps(
            {
                "storage": s.storage_url,
                "study": s.study_name,
                "trial": trial.number,
                "metric": s.opts.metric,
                "pruner": s.opts.pruner,
                "max_epochs": s.max_epochs,
                "params": values,
                "parent_pid": self.pid,
            }
        )
        env["WANDB_RUN_GROUP"] = s.study_name
        env["WANDB_JOB_TYPE"] = "trial"
        if s.wandb["auto"] and s.wandb["mode"]:  # the probe's answer, for every trial
            env["WANDB_MODE"] = s.wandb["mode"]
        cmd = [sys.executable, str(s.script), *fit]
        cmd += ["--run.root", str(s.study_dir), "--run.name", run_dir.name]
        print(
            f"trial {trial.number:>3} started: {shlex.join(param_flags(s.params, values))}",
            flush=True,
        )
        start = time.monotonic()
        signal_name = None
        with open(run_dir / "train.log", "w") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches tune, which stops the trial cleanly
                preexec_fn=_die_with_parent,
            )
            while True:
                try:
                    rc = proc.wait(timeout=HEARTBEAT_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    self._heartbeat(trial)
                except (KeyboardInterrupt, _Terminated) as sig:
                    if signal_name is not None:  # a second signal: stop waiting
                        proc.kill()
                        continue
                    signal_name = "SIGINT" if isinstance(sig, KeyboardInterrupt) else "SIGTERM"
                    print(f"tune: {signal_name}: stopping trial {trial.number} ...", flush=True)
                    proc.send_signal(getattr(signal, signal_name))
        seconds = time.monotonic() - start
        trial.set_user_attr("seconds", round(seconds, 1))
        trial.set_user_attr("returncode", rc)
        if signal_name is not None:
            self._tell_interrupted(trial, signal_name)
            raise KeyboardInterrupt if signal_name == "SIGINT" else _Terminated()
        self._tell(trial, rc, run_dir, seconds)

    def _tell_interrupted(self, trial: Any, name: str) -> None:
        """Fails a trial that a signal stopped and queues the same parameters again."""
        trial.set_user_attr("reason", f"interrupted by {name}: runs again on resume")
        self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        self.study.tell(trial, state=_state("FAIL"))
        self._current = None
        print(f"trial {trial.number:>3} interrupted ({name}): it runs again on resume", flush=True)

    def _tell(self, trial: Any, rc: int, run_dir: Path, seconds: float) -> None:
        """Reads how the trial's run ended and tells the study (complete / pruned / failed)."""
        s = self.setup
        frozen = self.storage.get_trial(self.trial_id(trial))
        attrs = frozen.user_attrs
        reports = {k: v for k, v in frozen.intermediate_values.items() if math.isfinite(v)}
        sign = 1 if s.direction == "maximize" else -1
        state, value, reason = "COMPLETE", None, None
        if "diverged" in attrs:
            state, reason = "FAIL", f"diverged: {attrs['diverged']}"
        elif "missing_metric" in attrs:
            logged = ", ".join(attrs["missing_metric"]) or "none"
            state, reason = "FAIL", f"{s.opts.metric} is not logged (logged: {logged})"
            self.config_error = (
                f"--tune.metric {s.opts.metric} is not logged by fit (logged: {logged})"
            )
        elif rc != 0:
            error = attrs.get("error") or _last_error(run_dir / "train.log")
            why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            if _DIVERGED.search(error):  # fit itself stopped on a non-finite value
                why = "diverged"
            state, reason = "FAIL", f"{why}: {error}"
        elif "pruned_at_epoch" in attrs:
            state = "PRUNED"
        elif not reports:
            state, reason = "FAIL", f"no {s.opts.metric} was reported (no validation ran)"
        else:
            value = max(reports.values(), key=lambda v: sign * v)
        if reason:
            trial.set_user_attr("reason", reason)
        if state == "COMPLETE":
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=_state(state))
        self._current = None
        self._print_trial(trial.number, state, value, reason, attrs.get("pruned_at_epoch"), seconds)

    def _print_trial(
        self, number: int, state: str, value: Any, reason: Any, pruned_at: Any, seconds: float
    ) -> None:
        word = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[state]
        text = f"trial {number:>3} {word}"
        if value is not None:
            text += f": {self.setup.opts.metric} = {value:.4f}"
            try:
                best = self.study.best_trial
                if best.number == number:
                    text += " (best so far)"
            except ValueError:
                pass
        if pruned_at is not None:
            text += f" at epoch {pruned_at}"
        if reason:
            text += f": {reason}"
        print(f"{text}  [{seconds:.0f} s]", flush=True)


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _grid_sampler(grid: dict[str, list[Any]], seed: int | None) -> Any:
    """Optuna's `GridSampler` that leaves stopping to tune's own count of trials (its
    ``after_trial`` stops ``study.optimize``, which tune does not use)."""
    from optuna.samplers import GridSampler

    class Grid(GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return Grid(grid, seed=seed)


def run_tune(args: list[str], *, fit_main: FitMain, cli_class: type, script: Path) -> Any:
    """``train.py tune <args>``: checks, runs the study, reports; returns the `StudyRunner`.

    Raises:
        TrainError: A bad option, space or fit flag (nothing created), or a metric that the
            trials do not log.
        SystemExit: 130 / 143 after a signal (the summary so far is printed first); 1 when no
            trial completed.
    """
    if any(a in ("-h", "--help") for a in args):
        print(plain(__doc__) + "\n\n" + plain(TuneOptions.__doc__))
        return None
    from .tune_report import finish_study

    setup = prepare(args, fit_main, cli_class, script)
    runner = StudyRunner(setup)
    print(
        f"tune: study {setup.study_name} ({setup.direction} {setup.opts.metric}), "
        f"{runner.total} trials wanted; storage {setup.storage_url}",
        flush=True,
    )
    runner.run()
    complete = finish_study(runner)
    if runner.config_error:
        raise TrainError(runner.config_error)
    if runner.interrupted:
        raise SystemExit(_SIGNAL_EXIT[runner.interrupted])
    if not complete:
        raise SystemExit(1)
    return runner
