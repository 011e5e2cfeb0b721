"""train.py at its edges, as real processes: W&B without a reachable server or without a key,
one-line errors, checkpoints whose settings differ from the flags, interrupted runs (a real
signal), resumed W&B runs, the large-vocabulary preset on a CPU, runs that stop mid-epoch."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from test_train import read_wandb_records, wandb_run_contents
from test_train import train as train_script  # the train.py module

from fusedce.lightning_modules import Classifier
from fusedce.lightning_modules.threads import choose_threads
from fusedce.lightning_modules.wandb_setup import wandb_unreachable

REPO = Path(__file__).resolve().parents[1]
LINEAR = str(REPO / "configs" / "linear.yaml")
LARGE_VOCAB = str(REPO / "configs" / "large_vocab.yaml")
# Small and fast: 700 training rows = 6 steps an epoch.
TINY = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.num_samples",
    "1000",
    "--run.plot",
    "false",
]
DUMMY_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a key; no server sees it


def env_for(runs: Path, **extra: str | None) -> dict[str, str]:
    """The environment of a train.py process: runs under ``runs``, no W&B settings inherited."""
    env = {**os.environ, "FUSEDCE_RUNS_DIR": str(runs), "HOME": str(runs.parent / "home")}
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        env.pop(key, None)
    env["WANDB_MODE"] = "offline"
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def train(
    args: list[str], runs: Path, timeout: int = 120, **env: str | None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env_for(runs, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_in_process(
    args: list[str], runs: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> subprocess.CompletedProcess:
    """``train.main(args)`` in this process, as ``python train.py`` would run it (the program
    name, the working directory, the environment of `env_for`): for runs refused before any
    training starts, where a process of their own would pay only a start and Lightning's
    import. Torch's thread count and Lightning's log filters are put back (a run sets them)."""
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FUSEDCE_RUNS_DIR", str(runs))
    monkeypatch.setenv("HOME", str(runs.parent / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    monkeypatch.chdir(REPO)  # relative paths resolve as in a `python train.py` run here
    names = ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero")
    loggers = [logging.getLogger(name) for name in names]
    filters = [list(logger.filters) for logger in loggers]  # train.py adds its own
    threads, code = torch.get_num_threads(), 0
    try:
        train_script.main(list(args))
    except SystemExit as stop:
        code = stop.code
    finally:
        torch.set_num_threads(threads)
        for logger, kept in zip(loggers, filters, strict=True):
            logger.filters[:] = kept
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["train.py", *args], code, out, err)


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


def wandb_run_id(run_dir: Path) -> str:
    """The run id recorded in the (single) offline W&B run file under ``run_dir``."""
    (wandb_file,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    (run_id,) = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert wandb_file.parent.name.endswith(f"-{run_id}")
    return run_id


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The ``error:`` line of a failed run, after checking it failed as a one-liner (code 2)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# ---------------------------------------------------------------------------------- W&B
def test_wandb_refused_server_goes_offline(tmp_path: Path) -> None:
    """A key in the environment (auto -> online) and a server that refuses: the run finishes
    offline, says so in one line, and its W&B files hold the metrics."""
    runs = tmp_path / "runs"
    proc = train(
        ["--trainer.max_epochs", "1", *TINY],
        runs,
        WANDB_MODE=None,
        WANDB_API_KEY=DUMMY_KEY,
        WANDB_BASE_URL="http://127.0.0.1:9",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if "W&B server unreachable" in line]
    assert len(lines) == 1 and "logs offline" in lines[0] and "wandb sync" in lines[0]
    assert "upload later with: wandb sync" in proc.stdout
    (run_dir,) = run_dirs(runs)
    assert list(run_dir.glob("wandb/offline-run-*"))
    run = wandb_run_contents(run_dir)
    assert 0.5 < run["summary"]["val/acc"] <= 1.0


def test_wandb_silent_server_times_out_offline(tmp_path: Path) -> None:
    """A server that accepts connections and never answers: offline after --run.wandb_timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # the kernel accepts; nobody reads or answers
    port = server.getsockname()[1]
    try:
        runs = tmp_path / "runs"
        start = time.monotonic()
        proc = train(
            ["--trainer.max_steps", "2", "--run.wandb_timeout", "1.5", *TINY],
            runs,
            WANDB_MODE=None,
            WANDB_API_KEY=DUMMY_KEY,
            WANDB_BASE_URL=f"http://127.0.0.1:{port}",
        )
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "within 1.5 s" in proc.stdout and "logs offline" in proc.stdout
    assert elapsed < 60
    (run_dir,) = run_dirs(runs)
    assert wandb_run_id(run_dir)


def test_wandb_online_without_key_is_one_line(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = train(["--run.wandb_mode", "online", *TINY], runs, WANDB_MODE=None)
    line = one_error_line(proc)
    assert "no API key" in line and "--run.wandb_mode offline" in line
    assert not runs.exists() or not any(runs.iterdir())


# ---------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--model.optimizer.lr", "-0.1"], "--model.optimizer.lr -0.1"),
        (["--model.optimizer.weight_decay", "-1"], "--model.optimizer.weight_decay -1"),
        (
            ["--model.lr_scheduler", "CosineAnnealingLR", "--model.lr_scheduler.T_max", "0"],
            "--model.lr_scheduler.T_max 0",
        ),
        (["--ckpt_path", "runs/nope/last.ckpt"], "--ckpt_path runs/nope/last.ckpt: no such file"),
        (["--trainer.max_epohcs", "3"], "--trainer.max_epohcs"),
        (["--optimizer", "SGD"], "--model.optimizer"),
        (["--run.threads", "0"], "--run.threads 0: must be at least 1"),
    ],
    ids=["lr", "weight_decay", "T_max", "ckpt_path", "typo", "top_level_optimizer", "threads"],
)
def test_bad_values_are_one_line_errors(
    args: list[str], flag: str, tmp_path: Path, monkeypatch, capfd
) -> None:
    runs = tmp_path / "runs"
    proc = train_in_process([*args, *TINY], runs, monkeypatch, capfd)
    line = one_error_line(proc)
    assert flag in line
    assert len(proc.stderr.splitlines()) <= 6, proc.stderr  # no screen of usage
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--model.activation", "swish"],
            "--model.activation: got 'swish'; expected one of: "
            "relu, leaky_relu, tanh, sigmoid, gelu",
        ),
        (
            ["--model.init=bogus"],
            "--model.init: got 'bogus'; expected one of: default, xavier, kaiming",
        ),
        (
            ["--model.loss_impl", "bogus"],
            "--model.loss_impl: got 'bogus'; expected one of: fused, torch",
        ),
    ],
    ids=["activation", "init", "loss_impl"],
)
def test_bad_choice_names_the_value_and_the_choices(
    args: list[str], line: str, tmp_path: Path, monkeypatch, capfd
) -> None:
    """A value outside a choice is exactly one line: the flag, the value, every valid choice."""
    runs = tmp_path / "runs"
    proc = train_in_process([*args, *TINY], runs, monkeypatch, capfd)
    assert one_error_line(proc) == f"train.py fit: error: {line}"
    assert proc.stderr.strip().splitlines() == [f"train.py fit: error: {line}"]
    assert not runs.exists() or not any(runs.iterdir())


def test_a_nested_class_argument_error_keeps_its_cause() -> None:
    """jsonargparse reports a bad ``--data.init_args.*`` value as a Union failure whose cause is
    nested under the class path: the one line keeps the key, the expected type and the value."""
    from fusedce.lightning_modules.cli_parser import clean_error

    raw = (
        'Parser key "data":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [<class 'NoneType'>, <class 'LightningDataModule'>]\n  Errors:\n"
        "    - Expected a <class 'NoneType'>\n"
        "    - Problem with given class_path 'fusedce.datamodules.CurveDataModule':\n"
        '        Parser key "batch_size":\n'
        "          Expected a <class 'int'>. Got value: abc\n"
        "  Given value type: <class 'NestedArg'>\n  Given value: NestedArg(val='abc')"
    )
    assert clean_error(raw) == (
        "Problem with given class_path 'fusedce.datamodules.CurveDataModule': "
        "Parser key \"batch_size\": Expected a <class 'int'>. Got value: abc"
    )


# ---------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-epoch fit of a [8] MLP (offline W&B), for the checkpoint tests; with two run options
    that change no checkpoint, checked by `test_help_and_runs_are_quiet` (one process less)."""
    runs = tmp_path_factory.mktemp("ckpt") / "runs"
    args = ["--trainer.max_epochs", "2", "--model.hidden_sizes", "[8]", "--run.name", "small"]
    args += ["--run.wandb_log_model", "true", "--run.threads", "2"]
    proc = train([*args, *TINY], runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = runs / "small"
    last = run_dir / "checkpoints" / "last.ckpt"
    return {"runs": runs, "run_dir": run_dir, "last": last, "proc": proc}


def test_ckpt_architecture_flag_conflict_is_refused(small_run: dict[str, Any]) -> None:
    runs = small_run["runs"]
    before = run_dirs(runs)
    ckpt = str(small_run["last"])
    proc = train(["validate", "--ckpt_path", ckpt, "--model.hidden_sizes", "[16]", *TINY], runs)
    line = one_error_line(proc)
    assert "--model.hidden_sizes [16] (checkpoint: [8])" in line
    # a config file that sets the architecture counts as explicit too
    proc = train(["fit", "--config", LINEAR, "--ckpt_path", ckpt, *TINY], runs)
    assert "--model.hidden_sizes [] (checkpoint: [8])" in one_error_line(proc)
    assert run_dirs(runs) == before


def test_ckpt_loss_flag_is_applied(small_run: dict[str, Any]) -> None:
    """--model.label_smoothing with a checkpoint: validates with that smoothing, and says so."""
    runs, ckpt = small_run["runs"], str(small_run["last"])
    losses = {}
    for smoothing in ("0.0", "0.5"):
        name = f"val-{smoothing}"
        args = ["validate", "--ckpt_path", ckpt, "--model.label_smoothing", smoothing]
        proc = train([*args, "--run.name", name, *TINY], runs)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if smoothing == "0.5":
            assert "applied over the checkpoint's settings: --model.label_smoothing 0.5" in (
                proc.stderr
            )
        config = (runs / name / "config.yaml").read_text()
        assert f"label_smoothing: {smoothing}" in config and "- 8" in config
        losses[smoothing] = json.loads((runs / name / "metrics.json").read_text())["metrics"]
    assert abs(losses["0.5"]["val/loss"] - losses["0.0"]["val/loss"]) > 1e-3  # smoothing used
    assert losses["0.5"]["val/acc"] == losses["0.0"]["val/acc"]  # same weights


def test_ckpt_of_another_model_is_refused(small_run: dict[str, Any], tmp_path: Path) -> None:
    class Other(LightningModule):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(width, 1)

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(Other())
    path = tmp_path / "other.ckpt"
    trainer.save_checkpoint(path)
    proc = train(["validate", "--ckpt_path", str(path), *TINY], tmp_path / "runs")
    line = one_error_line(proc)
    assert "hyperparameters width" in line and "not by fusedce.lightning_modules.Classifier" in line


def test_resume_continues_the_wandb_run(small_run: dict[str, Any]) -> None:
    runs, first = small_run["runs"], small_run["run_dir"]
    args = ["fit", "--ckpt_path", str(small_run["last"]), "--trainer.max_epochs", "3"]
    proc = train([*args, "--run.name", "resumed", *TINY], runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = runs / "resumed"
    assert wandb_run_id(resumed) == wandb_run_id(first)
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 18
    # asked otherwise: a new W&B run
    proc = train([*args, "--run.name", "fresh", "--run.wandb_resume", "false", *TINY], runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wandb_run_id(runs / "fresh") != wandb_run_id(first)


# ---------------------------------------------------------------------------------- signals
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_fit_reports_and_writes_metrics(sig: int, code: int, tmp_path: Path) -> None:
    """A real signal to a real run mid-training: summary, metrics.json, last.ckpt, W&B closed."""
    runs = tmp_path / "runs"
    long_run = ["--trainer.max_epochs", "10000", "--trainer.min_epochs", "10000"]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *long_run, "--run.name", "sig", *TINY],
        cwd=REPO,
        env=env_for(runs),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = runs / "sig" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 90
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == code, out[-3000:] + err[-3000:]
    assert f"interrupted by {signal.Signals(sig).name}" in out
    assert "Traceback" not in err
    summary = json.loads((runs / "sig" / "metrics.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] > 0
    assert "val/acc" in summary["metrics"]
    step = torch.load(last, weights_only=False)["global_step"]
    assert step == summary["global_step"]  # last.ckpt saved where the run stopped
    (wandb_file,) = (runs / "sig").glob("wandb/*run-*/run-*.wandb")
    kinds = [r.WhichOneof("record_type") for r in read_wandb_records(wandb_file)]
    assert "exit" in kinds  # the W&B run was finished, not abandoned


# ---------------------------------------------------------------------------------- presets
def test_mid_epoch_max_steps_with_early_stopping(tmp_path: Path) -> None:
    """max_steps ends inside the first epoch, before any validation: EarlyStopping and the
    plateau scheduler (both on val/loss) must not fail."""
    runs = tmp_path / "runs"
    proc = train(["--trainer.max_steps", "3", *TINY], runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = run_dirs(runs)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == 3 and summary["status"] == "finished"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sizes apply without a GPU only")
def test_large_vocab_preset_shrinks_on_cpu(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["--config", LARGE_VOCAB, "--trainer.max_steps", "2", "--run.name", "lv"]
    args += ["--trainer.limit_val_batches", "1", "--data.batch_size", "64"]
    args += ["--trainer.enable_progress_bar", "false"]
    proc = train(args, runs, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("train.py: no GPU")]
    assert "data.vocab_size=2048" in line and "data.num_workers=0" in line
    assert "data.batch_size" not in line  # the explicit flag wins
    assert "threads:     1 (a small model, 559,360 parameters" in proc.stdout
    config = (runs / "lv" / "config.yaml").read_text()
    assert "vocab_size: 2048" in config and "batch_size: 64" in config
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr


def test_thread_count_follows_the_model_size() -> None:
    """Under a million parameters: 1 thread; from a million on: torch's default; a flag wins."""
    small, large = torch.nn.Linear(998, 1000), torch.nn.Linear(1000, 1000)  # 999,000; 1,001,000
    assert choose_threads(None, small)[0] == 1
    threads, reason = choose_threads(None, large)
    assert threads == torch.get_num_threads() and reason.startswith("torch's default")
    assert choose_threads(3, large) == (3, "--run.threads")


# ---------------------------------------------------------------------------------- small items
def test_predictions_hold_inputs_and_targets(small_run: dict[str, Any]) -> None:
    runs = small_run["runs"]
    args = ["predict", "--ckpt_path", str(small_run["last"]), "--run.name", "pred", *TINY]
    proc = train(args, runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = torch.load(runs / "pred" / "predictions.pt")
    n = 100  # the test split of 1000 samples
    assert out["inputs"].shape == (n, 2) and out["targets"].shape == out["preds"].shape == (n,)
    true = (out["inputs"][:, 1] > out["inputs"][:, 0] ** 2).long()  # the curve task's label
    assert torch.equal(out["targets"], true)


def test_help_and_runs_are_quiet(small_run: dict[str, Any], tmp_path: Path) -> None:
    """``--help`` says fit is the default; a run prints no known third-party noise."""
    proc = train(["--help"], tmp_path / "runs")
    assert proc.returncode == 0 and "(default: fit)" in proc.stdout
    assert "(required)" not in proc.stdout
    proc = small_run["proc"]  # with --run.wandb_log_model true --run.threads 2
    assert "--run.wandb_log_model is not used: W&B is offline" in proc.stdout
    assert "threads:     2 (--run.threads)" in proc.stdout  # the flag overrides the choice
    out = proc.stdout + proc.stderr
    for noise in ("💡 Tip", "LeafSpec", "anonymous setting"):
        assert noise not in out


def test_compiled_model_matches_and_keeps_its_state_dict() -> None:
    compiled, plain = Classifier(hidden_sizes=[16], compile=True), Classifier(hidden_sizes=[16])
    plain.load_state_dict(compiled.state_dict())
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x = torch.randn(8, 2)
    torch.testing.assert_close(compiled(x), plain(x))


@pytest.mark.parametrize("timeout", [0.2, 0.5])
def test_wandb_probe_says_no_answer_whichever_deadline_fires(
    timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silent server: the probe thread's join and the socket's own timeout end at the same
    moment; whichever fires first, the reason is the same "no answer within" line (the line
    a user reads and the one `test_wandb_silent_server_times_out_offline` checks)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    try:
        reasons = {wandb_unreachable(timeout) for _ in range(3)}
    finally:
        server.close()
    assert reasons == {f"no answer from {url} within {timeout:g} s"}
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused, and no
    port = refused.getsockname()[1]  # other process can take the port meanwhile
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    try:
        reason = wandb_unreachable(timeout)
    finally:
        refused.close()
    assert reason is not None and "ConnectionRefusedError" in reason and str(port) in reason
