"""train.py under faults, as real processes: resuming from last.ckpt continues exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_edges import env_for

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
@pytest.mark.slow
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
