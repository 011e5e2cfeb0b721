"""The run directory: its name, and its hand-over to the DDP worker processes.

Lightning starts the workers of a multi-process run by running ``train.py`` again. The process
that chose the run directory (and the W&B mode) leaves them in environment variables, together
with its process id; a worker takes them over only if its parent is that process, so a later
unrelated run started from inside this one does not.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .errors import TrainError

RUN_DIR_ENV = "_FUSEDCE_RUN_DIR"
WANDB_MODE_ENV = "_FUSEDCE_WANDB_MODE"  # rank 0's W&B decision, for its DDP workers
_OWNER_PID_ENV = "_FUSEDCE_RUN_DIR_PID"
_HANDED_OVER = (RUN_DIR_ENV, WANDB_MODE_ENV, _OWNER_PID_ENV)
# A full disk is refused up front (the config, W&B files and the first checkpoint need at least
# this); a disk that fills later is caught where each checkpoint is written, naming the bytes.
MIN_FREE_BYTES = 64 << 10


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
    if _is_first_process():
        check_run_root(root)
        if opts.get("name") and holds_a_run(run_dir):
            raise TrainError(
                f"--run.name {name}: {run_dir} already holds a run; choose another name (or "
                "remove that directory)"
            )
    hand_over(RUN_DIR_ENV, str(run_dir))
    return run_dir


# What a run leaves in its directory (a log file written beside it by a launcher is not a run).
RUN_MARKERS = ("config.yaml", "metrics.json", "checkpoints", "wandb")


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (the start of) a run: its config, metrics, checkpoints or W&B
    files."""
    return any((run_dir / marker).exists() for marker in RUN_MARKERS)


def _is_first_process() -> bool:
    """The process that owns the run directory: rank 0 of the job (other nodes of a multi-node
    job compute the same directory, on a shared file system, and must not refuse it)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def check_run_root(root: Path) -> None:
    """Raises a one-line ``TrainError`` naming ``--run.root`` unless ``root`` is (or can be
    made) a directory where this process can create files, with ``MIN_FREE_BYTES`` free.

    A file is created and removed to test writability: permission bits do not tell (root
    ignores them, a read-only mount does not show in them)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TrainError(f"--run.root {root}: exists and is not a directory") from None
    except OSError as err:
        raise TrainError(f"--run.root {root}: cannot be created ({err.strerror})") from None
    if not root.is_dir():
        raise TrainError(f"--run.root {root}: exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise TrainError(f"--run.root {root}: not writable ({err.strerror})") from None
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise TrainError(
            f"--run.root {root}: {free >> 10} KiB free, a run needs at least "
            f"{MIN_FREE_BYTES >> 10} KiB"
        )
