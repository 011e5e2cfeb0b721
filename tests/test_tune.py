"""train.py lr_find and train.py tune: the range test's files, a study's trials as W&B runs of one
group, resuming to a total, a diverging trial, best.yaml, signals (Ctrl-C, kill -9), two
processes on one storage, and bad search spaces."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.cli import LightningCLI

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # train.py is a top-level script, not part of the package
    sys.path.insert(0, str(REPO))
from test_train import read_wandb_records, wandb_run_contents  # noqa: E402

import train  # noqa: E402
from fusedce.lightning_modules.errors import TrainError  # noqa: E402
from fusedce.lightning_modules.search_space import flag_value, load_space  # noqa: E402

# A tiny budget: 2 epochs of 3 batches, 2 validation batches.
TINY = [
    "--trainer.max_epochs", "2",
    "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--run.plot", "false",
]  # fmt: skip
NO_WANDB = ["--run.wandb_mode", "disabled"]


def _env(runs: Path) -> dict[str, str]:
    env = {**os.environ, "FUSEDCE_RUNS_DIR": str(runs), "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    return env


def run_train(args: list[str], runs: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=_env(runs),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_train(args: list[str], runs: Path, log: Path) -> subprocess.Popen:
    """``train.py <args>`` in the background, as from a shell (SIGINT is Ctrl-C)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "train.py", *args],
            cwd=REPO,
            env=_env(runs),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def study_trials(study_dir: Path) -> list[dict[str, Any]]:
    return json.loads((study_dir / "study.json").read_text())["trials"]


def processes_mentioning(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


# ------------------------------------------------------------------------------ fast checks
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model.l2: {type: float, low: 1.0, high: 0.1}\n",
            "space key model.l2: low 1.0 > high 0.1",
        ),
        (
            "model.optimizer.lr: {type: float, low: 0.0, high: 1.0, log: true}\n",
            "space key model.optimizer.lr: a log range must be > 0",
        ),
        ("model.l2: {type: uniform, low: 0, high: 1}\n", "space key model.l2: unknown type"),
        ("model.l2: {type: float, low: 0.0}\n", "space key model.l2: `high` is missing"),
        ("model.l2: {type: float, low: 0.0, hihg: 1.0}\n", "unknown field 'hihg'"),
        ("model.batch_norm: {type: categorical, choices: []}\n", "non-empty list"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_space_file_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_space(write_space(tmp_path / "space.yaml", text))


def test_space_keys_values_and_flags(tmp_path: Path) -> None:
    """class_path keys come first; YAML's text `1e-4` is a number; values become flags that
    YAML reads back (a float keeps its dot and signed exponent)."""
    params = load_space(
        write_space(
            tmp_path / "space.yaml",
            "model.optimizer.lr: {type: float, low: 1e-4, high: 1.0, log: true}\n"
            "model.optimizer.class_path: {type: categorical, choices: [torch.optim.SGD]}\n"
            "model.hidden_sizes: {type: categorical, choices: [[8, 8], [16]]}\n",
        )
    )
    assert params[0].key == "model.optimizer.class_path"
    assert params[1].low == 1e-4
    hidden = params[2]
    assert hidden.encoded_choices() == ["[8, 8]", "[16]"]
    assert hidden.decode("[16]") == [16]
    assert [flag_value(v) for v in (1e-05, 1e30, 0.5, True, None, [8, 8])] == [
        "1.0e-05",
        "1.0e+30",
        "0.5",
        "true",
        "null",
        "[8, 8]",
    ]


def test_lightning_cli_runs_the_cli_method_named_after_the_subcommand() -> None:
    """lr_find's CLI defines `fit`, which LightningCLI calls instead of `Trainer.fit`."""
    import inspect

    source = inspect.getsource(LightningCLI._run_subcommand)
    assert "getattr(self, subcommand, default)" in source


@pytest.mark.parametrize(
    ("space", "flags", "message"),
    [
        ("model.nope: {type: float, low: 0.0, high: 1.0}\n", [], "space key model.nope: not an"),
        ("model.l2: {type: float, low: 1.0, high: 0.1}\n", [], "space key model.l2: low"),
        (
            "model.optimizer.lr: {type: float, low: 0.0, high: 1.0, log: true}\n",
            [],
            "space key model.optimizer.lr: a log range",
        ),
        ("model.l2: {type: normal, low: 0.0, high: 1.0}\n", [], "space key model.l2: unknown type"),
        (
            "model.batch_norm: {type: categorical, choices: [true, maybe]}\n",
            [],
            'space key model.batch_norm: Parser key "model.batch_norm"',
        ),
        (
            "model.l2: {type: float, low: 0.0, high: 1.0}\n",
            ["--tune.sampler", "sobol"],
            "--tune.sampler: unknown sampler 'sobol'",
        ),
        (
            "model.l2: {type: float, low: 0.0, high: 1.0}\n",
            ["--tune.sampler", "grid"],
            "space key model.l2: the grid sampler needs a `step`",
        ),
    ],
)
def test_bad_space_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    space: str,
    flags: list[str],
    message: str,
) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("FUSEDCE_RUNS_DIR", str(runs))
    path = write_space(tmp_path / "space.yaml", space)
    with pytest.raises(SystemExit) as exit_:
        train.main(["tune", "--tune.space", str(path), *flags, *NO_WANDB])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("train.py tune: error: "), err
    assert message in err[0], err
    assert not runs.exists()


# ------------------------------------------------------------------------- real processes
# Slow: repeats test_bad_space_is_one_line_exit_2_and_creates_nothing (the same error, exit code
# and nothing created, in-process) in a train.py process, whose one-line errors
# test_train_edges.py checks.
@pytest.mark.slow
def test_bad_space_from_the_command_line(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    space = write_space(tmp_path / "s.yaml", "model.l2: {type: float, low: 1.0, high: 0.0}\n")
    proc = run_train(["tune", "--tune.space", str(space)], runs)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "train.py tune: error: space key model.l2: low 1.0 > high 0.0"
    assert not runs.exists()


def test_lr_find_writes_the_plot_and_a_finite_positive_suggestion(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = run_train(
        ["lr_find", "--lr_find.num_training", "30", "--trainer.enable_progress_bar", "false"],
        runs,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = runs.glob("*-lr_find-*")
    results = json.loads((run_dir / "lr_find.json").read_text())
    suggestion = results["suggestion"]
    assert isinstance(suggestion, float) and math.isfinite(suggestion) and suggestion > 0
    assert len(results["lr"]) == len(results["loss"]) > 10
    assert (run_dir / "lr_find.png").stat().st_size > 10_000
    flag = f"--model.optimizer.lr {suggestion:.3g}"
    assert f"train with:  python train.py fit --trainer.enable_progress_bar false {flag}" in (
        proc.stdout
    )
    history = wandb_run_contents(run_dir)["history"]
    assert any("lr_find" in row for row in history)


def test_study_resumes_to_a_total_in_one_wandb_group_and_best_yaml_trains(tmp_path: Path) -> None:
    """2 trials (grid over 3 learning rates, one of them 1e30), each a W&B run of the study's
    group; rerun with --tune.trials 3: 3 trials, the diverging one failed; best.yaml trains.
    (Each trial is a process: their number, not their length, sets this test's time.)"""
    runs = tmp_path / "runs"
    space = write_space(
        tmp_path / "lr.yaml",
        "model.optimizer.lr:\n  {type: categorical, choices: [1.0e+30, 0.01, 0.3]}\n",
    )
    args = ["tune", "--tune.space", str(space), "--tune.sampler", "grid", *TINY]
    first = run_train([*args, "--tune.trials", "2"], runs)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study_dir = runs / "lr"
    trials = study_trials(study_dir)
    assert [t["number"] for t in trials] == [0, 1]
    for t in trials:  # every trial: its own run dir and W&B run, in the study's group
        run_dir = Path(t["run_dir"])
        assert run_dir.parent == study_dir
        (wandb_file,) = run_dir.glob("wandb/*run-*/run-*.wandb")
        (run,) = [r.run for r in read_wandb_records(wandb_file) if r.HasField("run")][:1]
        assert (run.run_group, run.job_type) == ("lr", "trial")
        config = wandb_run_contents(run_dir)["config"]
        assert config["tune"]["params"] == t["params"]
        assert config["tune"]["trial"] == t["number"]
    assert "reproduce:   python train.py fit" in first.stdout

    second = run_train([*args, "--tune.trials", "3"], runs)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    trials = study_trials(study_dir)
    assert len(trials) == 3
    assert sorted(t["params"]["model.optimizer.lr"] for t in trials) == [0.01, 0.3, 1e30]
    for t in trials:
        if t["params"]["model.optimizer.lr"] == 1e30:
            assert t["state"] == "FAIL"
            assert t["reason"].startswith("diverged: "), t["reason"]
        else:
            assert t["state"] == "COMPLETE", t
            assert 0.0 < t["value"] <= 1.0
    summary = json.loads((study_dir / "study.json").read_text())
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in trials if t["state"] == "COMPLETE")
    assert (study_dir / "study.png").stat().st_size > 10_000
    study_runs = sorted(study_dir.glob("wandb/*run-*/run-*.wandb"))  # one per tune command
    assert len(study_runs) == 2
    for path in study_runs:
        (run,) = [r.run for r in read_wandb_records(path) if r.HasField("run")][:1]
        assert (run.run_group, run.job_type) == ("lr", "study")

    refit = run_train(["fit", "--config", str(study_dir / "best.yaml")], runs)
    assert refit.returncode == 0, refit.stderr[-3000:]
    (run_dir,) = [d for d in runs.iterdir() if d.name != "lr"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["metrics"]["val/acc_best"] == pytest.approx(best["value"], abs=1e-6)


def test_ctrl_c_and_kill_9_lose_only_the_trial_in_flight(tmp_path: Path) -> None:
    """Ctrl-C: the trial in flight stops, the summary so far is printed, exit 130; kill -9: the
    trial's own process stops too; each rerun runs the stopped trial again, to the total."""
    runs = tmp_path / "runs"
    space = write_space(
        tmp_path / "sig.yaml", "model.optimizer.lr: {type: categorical, choices: [0.01, 0.03]}\n"
    )
    args = ["tune", "--tune.space", str(space), "--tune.sampler", "grid", "--tune.trials", "2"]
    args += [*TINY, *NO_WANDB]
    study_dir = runs / "sig"

    proc = start_train(args, runs, tmp_path / "a.log")
    wait_for(study_dir / "trial-0000" / "train.log", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    out = (tmp_path / "a.log").read_text()
    assert "trial   0 interrupted (SIGINT)" in out
    assert "Study sig (interrupted by SIGINT: the summary so far)" in out
    trials = study_trials(study_dir)
    assert [t["state"] for t in trials] == ["FAIL", "WAITING"]
    first_params = trials[0]["params"]

    proc = start_train(args, runs, tmp_path / "b.log")
    wait_for(study_dir / "trial-0001" / "train.log", proc)
    time.sleep(1.0)
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 120  # the trial's fit gets SIGTERM when tune dies
    while processes_mentioning(str(study_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(str(study_dir))

    done = run_train(args, runs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trial   1 lost: its tune process" in done.stdout
    trials = study_trials(study_dir)
    states = [(t["number"], t["state"], t["retry_of"]) for t in trials]
    assert states == [(0, "FAIL", None), (1, "FAIL", 0), (2, "COMPLETE", 1), (3, "COMPLETE", None)]
    assert trials[1]["params"] == trials[2]["params"] == first_params
    assert trials[3]["params"] != first_params
    assert trials[1]["reason"].startswith("lost: ")


def test_two_processes_share_one_grid_study(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    space = write_space(
        tmp_path / "two.yaml",
        "model.optimizer.lr: {type: categorical, choices: [0.003, 0.03, 0.1]}\n",
    )
    args = ["tune", "--tune.space", str(space), "--tune.sampler", "grid", "--tune.trials", "3"]
    args += [*TINY, "--trainer.max_epochs", "1", *NO_WANDB]
    procs = [start_train(args, runs, tmp_path / f"{i}.log") for i in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    trials = study_trials(runs / "two")
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    assert sorted(t["params"]["model.optimizer.lr"] for t in trials) == [0.003, 0.03, 0.1]


class _FakeTrainer:
    """What `TrialReporter` reads of a trainer after a validation."""

    is_global_zero, sanity_checking, world_size = True, False, 1

    def __init__(self, epoch: int, **metrics: float) -> None:
        import torch

        self.current_epoch = epoch
        self.callback_metrics = {
            k.replace("_", "/", 1): torch.tensor(v) for k, v in metrics.items()
        }
        self.should_stop = False


def test_trial_reporter_prunes_a_poor_trial_and_stops_a_diverged_one(tmp_path: Path) -> None:
    """After 5 finished trials, the median pruner stops a trial far below them from its second
    validation on; a non-finite loss stops a trial as diverged."""
    import optuna

    from fusedce.lightning_modules.tune_trial import TrialReporter, open_storage

    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(journal), direction="maximize")
    for _ in range(5):
        trial = study.ask()
        trial.report(0.9, 0)
        trial.report(0.95, 1)
        study.tell(trial, 0.95)

    poor = study.ask()
    reporter = TrialReporter(storage=journal, study="s", trial=poor.number, metric="val/acc")
    first = _FakeTrainer(0, val_acc=0.1, val_loss=2.0, train_loss=2.0)
    reporter.on_validation_end(first, None)  # type: ignore[arg-type]
    assert not first.should_stop  # epoch 0: the pruner's warm-up
    second = _FakeTrainer(1, val_acc=0.1, val_loss=2.0, train_loss=2.0)
    reporter.on_validation_end(second, None)  # type: ignore[arg-type]
    assert second.should_stop
    frozen = study.trials[poor.number]
    assert frozen.user_attrs["pruned_at_epoch"] == 1
    assert frozen.intermediate_values == pytest.approx({0: 0.1, 1: 0.1})

    diverged = study.ask()
    reporter = TrialReporter(storage=journal, study="s", trial=diverged.number, metric="val/acc")
    nan = _FakeTrainer(0, val_acc=0.5, val_loss=float("nan"), train_loss=float("inf"))
    reporter.on_validation_end(nan, None)  # type: ignore[arg-type]
    assert nan.should_stop
    reason = study.trials[diverged.number].user_attrs["diverged"]
    assert reason in ("train/loss = inf at epoch 0", "val/loss = nan at epoch 0")

    crashed = study.ask()  # an exception that ends the run is recorded for tune
    reporter = TrialReporter(storage=journal, study="s", trial=crashed.number, metric="val/acc")
    reporter.on_exception(_FakeTrainer(0), None, RuntimeError("out of memory\nmore"))  # type: ignore[arg-type]
    assert study.trials[crashed.number].user_attrs["error"] == "RuntimeError: out of memory"


def test_lr_find_suggests_the_steepest_descent_against_log_lr() -> None:
    """Noise at the smallest rates (tiny steps in lr) does not win over the real descent."""
    from fusedce.lightning_modules.lr_find import steepest_descent

    lrs = [10 ** (-8 + 8 * i / 99) for i in range(100)]
    losses = [0.65 + (0.001 if i % 2 else 0.0) for i in range(100)]  # flat and noisy
    for i in range(70, 90):  # the descent: 1e-2.3 .. 1e-0.8
        losses[i] = 0.65 - 0.02 * (i - 70) - (0.05 if i >= 80 else 0.0)
    suggestion = steepest_descent(lrs, losses)
    assert suggestion == lrs[80] or suggestion == lrs[79]
    assert steepest_descent(lrs, sorted(losses)) is None  # rising only: no suggestion
    assert steepest_descent(lrs[:12], losses[:12]) is None  # too few points
