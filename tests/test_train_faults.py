"""train.py under faults, as real processes: resuming from last.ckpt continues exactly, a kill -9
during a checkpoint write or a full disk leaves the previous checkpoint loadable, and a run that
diverges stops with one line and exit code 3 (and is never resumed from non-finite weights).

The checkpoint-IO hooks below are loaded by the train.py processes through
``--trainer.plugins test_train_faults.<Class>`` (``tests/`` on their PYTHONPATH).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from test_train import wandb_run_contents
from test_train_edges import env_for, one_error_line

from fusedce.lightning_modules.checkpoint_io import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
# 700 training rows = 6 steps an epoch; no W&B unless a test wants it.
TINY = [
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--data.num_samples", "1000",
    "--run.plot", "false",
    "--run.wandb_mode", "disabled",
]  # fmt: skip
STEPS_PER_EPOCH = 6


# ---------------------------------------------------------------------------------- IO hooks
class _HookedIO(AtomicCheckpointIO):
    """Remembers the path of the checkpoint being written (for `write`)."""

    path = Path()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options=None) -> None:
        self.path = Path(path)
        super().save_checkpoint(checkpoint, path, storage_options)


class SlowCheckpointIO(_HookedIO):
    """Rewrites of an existing ``last.ckpt`` go in 2 KiB pieces, 20 ms apart, after touching
    ``$FAULT_DIR/writing`` (the test kills the process in the middle)."""

    def write(self, data: memoryview, file: IO[bytes]) -> None:
        if self.path.name != "last.ckpt" or not self.path.exists():
            file.write(data)
            return
        (Path(os.environ["FAULT_DIR"]) / "writing").touch()
        for start in range(0, len(data), 2048):
            file.write(data[start : start + 2048])
            file.flush()
            time.sleep(0.02)


class FullDiskCheckpointIO(_HookedIO):
    """The first rewrite of ``last.ckpt`` gets half way, then the disk is full (ENOSPC)."""

    def write(self, data: memoryview, file: IO[bytes]) -> None:
        if self.path.name != "last.ckpt" or not self.path.exists():
            file.write(data)
            return
        file.write(data[: len(data) // 2])
        file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------------- helpers
def train(
    args: list[str], runs: Path, timeout: int = 120, **env: str
) -> subprocess.CompletedProcess:
    environ = env_for(runs, **env)
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "train.py", *TINY, *args],  # args after TINY: they win
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True, map_location="cpu")


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished 2-epoch fit of the default model."""
    runs = tmp_path_factory.mktemp("faults") / "runs"
    ok(train(["--trainer.max_epochs", "2", "--run.name", "two"], runs))
    return {"runs": runs, "last": runs / "two" / "checkpoints" / "last.ckpt"}


# ---------------------------------------------------------------------------------- last.ckpt
def test_resume_from_last_ckpt_equals_an_uninterrupted_run(two_epochs: dict[str, Any]) -> None:
    """last.ckpt is the state at the end of the fit: resuming it for one more epoch gives the
    metrics of a 3-epoch run, to the last bit."""
    runs, last = two_epochs["runs"], two_epochs["last"]
    assert load(last)["global_step"] == summary(runs / "two")["global_step"] == 2 * STEPS_PER_EPOCH
    resume = ["--ckpt_path", str(last), "--trainer.max_epochs", "3", "--run.name", "resumed"]
    ok(train(resume, runs))
    ok(train(["--trainer.max_epochs", "3", "--run.name", "straight"], runs))
    resumed, straight = summary(runs / "resumed"), summary(runs / "straight")
    assert resumed["global_step"] == straight["global_step"] == 3 * STEPS_PER_EPOCH
    assert resumed["metrics"] == straight["metrics"]
    assert load(runs / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 18


# ---------------------------------------------------------------------------------- atomic saves
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    runs, fault = tmp_path / "runs", tmp_path / "fault"
    fault.mkdir()
    args = ["--trainer.max_epochs", "50", "--run.name", "k", *TINY]
    args += ["--trainer.plugins", "test_train_faults.SlowCheckpointIO"]
    environ = env_for(runs, FAULT_DIR=str(fault))
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not (fault / "writing").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no second write of last.ckpt started"
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the slow write
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    ckpt_dir = runs / "k" / "checkpoints"
    partial = list(ckpt_dir.glob(".last.ckpt.*.tmp"))
    assert partial, "the kill came after the write"  # the interrupted temporary file
    last = load(ckpt_dir / "last.ckpt")  # the previous one, whole
    assert last["global_step"] == STEPS_PER_EPOCH
    assert partial[0].stat().st_size < (ckpt_dir / "last.ckpt").stat().st_size


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["--trainer.max_epochs", "3", "--run.name", "full"]
    proc = train([*args, "--trainer.plugins", "test_train_faults.FullDiskCheckpointIO"], runs)
    line = one_error_line(proc)
    ckpt_dir = runs / "full" / "checkpoints"
    assert f"no space left for checkpoint {ckpt_dir / 'last.ckpt'}: it needs " in line
    assert " bytes" in line
    assert not list(ckpt_dir.glob("*.tmp")) and not list(ckpt_dir.glob(".*.tmp"))
    assert load(ckpt_dir / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    assert summary(runs / "full")["status"] == "failed"


def _mount_namespace() -> list[str] | None:
    """The ``unshare`` command that gives a process its own mount namespace (None: none)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for cmd in ([unshare, "-m"], [unshare, "-rm"]):
        probe = subprocess.run([*cmd, "true"], capture_output=True)
        if probe.returncode == 0:
            return cmd
    return None


def test_full_tmpfs_is_one_line_and_keeps_the_previous_checkpoint(
    two_epochs: dict[str, Any], tmp_path: Path
) -> None:
    """A real full disk: a tmpfs with room for the first epoch's two checkpoints only (mounted
    in a private mount namespace of the run; skipped where mounting is not allowed)."""
    unshare = _mount_namespace()
    if unshare is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm)")
    size_kib = (2 * two_epochs["last"].stat().st_size + 48 * 1024) // 1024
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    args = ["--trainer.max_epochs", "3", "--run.root", str(mnt), "--run.name", "tmpfs", *TINY]
    script = (
        f'mount -t tmpfs -o size={size_kib}k tmpfs "$1" || exit 97; shift; cd "$REPO"; '
        '"$@"; rc=$?; cp -a "$MNT/." "$OUT/"; exit $rc'
    )
    environ = {**env_for(tmp_path / "runs"), "REPO": str(REPO), "MNT": str(mnt), "OUT": str(out)}
    proc = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", str(mnt), sys.executable, "train.py", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 97:
        pytest.skip(f"mounting a tmpfs is not allowed here: {proc.stderr.strip()[-200:]}")
    line = one_error_line(proc)
    assert "no space left for checkpoint " in line and " bytes, the device has " in line
    ckpt_dir = out / "tmpfs" / "checkpoints"
    assert not list(ckpt_dir.glob(".*.tmp"))
    assert load(ckpt_dir / "last.ckpt")["global_step"] == STEPS_PER_EPOCH


# ---------------------------------------------------------------------------------- divergence
def test_diverged_run_stops_with_one_line_and_exit_3(tmp_path: Path) -> None:
    """SGD with lr 1e30 and no clipping: non-finite from the second step on."""
    runs = tmp_path / "runs"
    args = ["--model.optimizer", "SGD", "--model.optimizer.lr", "1e30"]
    args += ["--trainer.gradient_clip_val", "null", "--run.name", "nan"]
    proc = train([*args, "--run.wandb_mode", "offline"], runs)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert line.startswith("train.py fit: error: the run diverged at step ")
    assert "train/loss is nan" in line and "no checkpoint was written before it" in line
    result = summary(runs / "nan")
    assert result["status"] == "diverged" and result["error"] in line
    assert not (runs / "nan" / "checkpoints").exists()
    assert wandb_run_contents(runs / "nan")["summary"]["status"] == "diverged"


def test_diverged_run_names_its_last_finite_checkpoint(tmp_path: Path) -> None:
    """A learning rate that explodes after the first epoch: the run stops in the second epoch,
    names last.ckpt of the first, and writes no checkpoint of the diverged state."""
    runs = tmp_path / "runs"
    args = ["--model.optimizer", "SGD", "--model.optimizer.lr", "0.1"]
    args += ["--model.lr_scheduler", "ExponentialLR", "--model.lr_scheduler.gamma", "1e12"]
    args += ["--trainer.gradient_clip_val", "null", "--trainer.max_epochs", "3"]
    proc = train([*args, "--run.name", "boom"], runs)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt_dir = runs / "boom" / "checkpoints"
    (line,) = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert f"last finite checkpoint: {ckpt_dir / 'last.ckpt'} (step {STEPS_PER_EPOCH})" in line
    assert "(epoch 1)" in line
    for path in ckpt_dir.glob("*.ckpt"):  # best and last: the first epoch's, finite
        ckpt = load(path)
        assert ckpt["global_step"] == STEPS_PER_EPOCH
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert summary(runs / "boom")["status"] == "diverged"


def test_resume_from_non_finite_weights_is_refused(
    two_epochs: dict[str, Any], tmp_path: Path
) -> None:
    ckpt = load(two_epochs["last"])
    ckpt["state_dict"]["net.head.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    runs = tmp_path / "runs"
    line = one_error_line(train(["--ckpt_path", str(bad)], runs))
    assert f"--ckpt_path {bad}: its weights are not finite (net.head.weight)" in line
    assert not runs.exists() or not any(runs.iterdir())
