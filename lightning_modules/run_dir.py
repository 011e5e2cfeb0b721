"""The run directory: its name, and its hand-over to the DDP worker processes.

Lightning starts the workers of a multi-process run by running ``train.py`` again. The process
that chose the run directory (and the W&B mode) leaves them in environment variables, together
with its process id; a worker takes them over only if its parent is that process, so a later
unrelated run started from inside this one does not.
"""

from __future__ import annotations

import datetime as _dt
import os
import uuid
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "_FUSEDCE_RUN_DIR"
WANDB_MODE_ENV = "_FUSEDCE_WANDB_MODE"  # rank 0's W&B decision, for its DDP workers
_OWNER_PID_ENV = "_FUSEDCE_RUN_DIR_PID"
_HANDED_OVER = (RUN_DIR_ENV, WANDB_MODE_ENV, _OWNER_PID_ENV)


def handed_over(key: str) -> str | None:
    """The value the launching process left under ``key``, in its DDP workers only."""
    value = os.environ.get(key)
    is_worker = os.environ.get("LOCAL_RANK", "0") != "0"
    if value and is_worker and os.environ.get(_OWNER_PID_ENV) == str(os.getppid()):
        return value
    return None


def hand_over(key: str, value: str) -> None:
    """Leaves ``value`` under ``key`` for the DDP workers that this process will start."""
    os.environ[key] = value
    os.environ[_OWNER_PID_ENV] = str(os.getpid())


def end_hand_over() -> None:
    """Removes what this process handed over (its workers have read it by now)."""
    if os.environ.get(_OWNER_PID_ENV) == str(os.getpid()):
        for key in _HANDED_OVER:
            os.environ.pop(key, None)


def choose_run_dir(opts: dict[str, Any], trainer_cfg: dict[str, Any], subcommand: str) -> Path:
    """The run directory: ``trainer.default_root_dir``, the launching process's choice (in a
    DDP worker), or ``<root>/<name>`` from the ``--run`` options.

    Args:
        opts: The ``--run`` options as a dict (``root``, ``name``).
        trainer_cfg: The instantiated ``trainer`` section (``default_root_dir``).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict`` (part of the default name).
    """
    if trainer_cfg.get("default_root_dir"):
        return Path(trainer_cfg["default_root_dir"])
    inherited = handed_over(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    root = Path(opts.get("root") or os.environ.get("FUSEDCE_RUNS_DIR") or "runs")
    name = opts.get("name")
    if not name:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
        if job and job != "none":  # identical in every process of the job, on every node
            name = f"{subcommand}-job{job}"
        else:
            name = f"{stamp}-{subcommand}-{uuid.uuid4().hex[:6]}"
    run_dir = (root / name).resolve()
    hand_over(RUN_DIR_ENV, str(run_dir))
    return run_dir
