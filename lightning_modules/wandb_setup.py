"""Weights & Biases for ``train.py``: the mode a run logs in, the server probe, the default
logger, and the resolved configuration in the W&B run."""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from .errors import TrainError
from .run_dir import WANDB_MODE_ENV, hand_over, handed_over

_DEFAULT_WANDB_URL = "https://api.wandb.ai"


def resolve_wandb_mode(mode: str) -> str:
    """``online`` / ``offline`` / ``disabled`` for a ``RunOptions.wandb_mode`` value."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "run"):
        return "online"
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_base_url() -> str:
    """The W&B server an online run talks to (env ``WANDB_BASE_URL``, default the W&B cloud)."""
    return (os.environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_URL).rstrip("/")


def wandb_has_credentials() -> bool:
    """Whether W&B finds credentials: ``WANDB_API_KEY``, an identity token file or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        # wandb's own .netrc reader (an internal module: wandb has no public "is there a key"
        # call that does not prompt); pinned by tests/test_library_internals.py.
        from wandb.sdk.lib.wbauth import wbnetrc

        return wbnetrc.read_netrc_auth(host=wandb_base_url()) is not None
    except Exception:  # an unreadable .netrc or another wandb layout: no usable key
        return False


def wandb_unreachable(timeout: float) -> str | None:
    """Why the W&B server cannot be reached within ``timeout`` seconds (None if it answers).

    Any HTTP answer counts as reachable. The request runs in a daemon thread so that the
    deadline also covers name resolution, which socket timeouts do not bound.
    """
    url = wandb_base_url()
    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)
        except Exception as err:  # URLError, timeouts, refused connections, bad URLs
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):  # the socket's own deadline: the same "no answer"
                result.append(f"no answer from {url} within {timeout:g} s")
            else:
                text = f"{type(reason).__name__}: {reason}" if str(reason) else repr(reason)
                result.append(f"{url}: {text}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return f"no answer from {url} within {timeout:g} s"
    return result[0]


def settle_wandb_mode(opts: dict[str, Any], logger_cfg: Any) -> str | None:
    """The mode of the default W&B logger: ``online``, ``offline`` or ``disabled``.

    An online run without credentials is refused; one whose server does not answer within
    ``wandb_timeout`` goes offline (one line says so). DDP workers take over the launching
    process's decision instead of probing again.

    Args:
        opts: The ``--run`` options as a dict.
        logger_cfg: The configured ``trainer.logger``.

    Returns:
        The mode, or None where the default logger is not used (``logger`` false or configured).

    Raises:
        TrainError: Online without credentials.
    """
    if logger_cfg not in (None, True):
        return None  # logger false or a configured logger: not this CLI's W&B
    inherited = handed_over(WANDB_MODE_ENV)
    if inherited:
        return inherited
    mode = resolve_wandb_mode(opts.get("wandb_mode") or "auto")
    if mode == "online":
        if not wandb_has_credentials():
            raise TrainError(
                "W&B is online (--run.wandb_mode / WANDB_MODE) but has no API key: set "
                "WANDB_API_KEY or run `wandb login`, or use --run.wandb_mode offline"
            )
        timeout = float(opts.get("wandb_timeout") or 10.0)
        reason = wandb_unreachable(timeout)
        if reason is not None:
            print(
                f"train.py: W&B server unreachable ({reason}); this run logs offline: "
                "upload it later with the `wandb sync` line of the results summary",
                flush=True,
            )
            mode = "offline"
    hand_over(WANDB_MODE_ENV, mode)
    return mode


def make_logger(
    configured: Any, opts: dict[str, Any], run_dir: Path, mode: str, resume_id: str | None
) -> Any:
    """The trainer's logger: the configured one, or the default for ``mode``.

    Args:
        configured: The configured ``trainer.logger`` (None / True: the default).
        opts: The ``--run`` options as a dict.
        run_dir: The run directory (the logger's save directory).
        mode: ``online``, ``offline`` or ``disabled`` (`settle_wandb_mode`).
        resume_id: The W&B run id to continue (None: a new W&B run).

    Returns:
        ``configured`` where it is false or a logger; a ``CSVLogger`` writing ``metrics.csv``
        into the run directory for ``disabled``; else a ``WandbLogger``.
    """
    if configured is False or isinstance(configured, Logger | list):
        return configured
    if mode == "disabled":  # no W&B: keep the metrics as CSV in the run directory
        return CSVLogger(save_dir=str(run_dir), name="", version="")
    log_model = opts.get("wandb_log_model", False)
    if log_model and mode != "online":  # Lightning refuses log_model in offline mode
        print(
            "train.py: --run.wandb_log_model is not used: W&B is offline (the checkpoints "
            "stay in the run directory)",
            flush=True,
        )
        log_model = False
    extra: dict[str, Any] = {"id": resume_id, "resume": "allow"} if resume_id else {}
    logger = WandbLogger(
        name=run_dir.name,
        save_dir=str(run_dir),
        project=opts.get("wandb_project") or "fusedce",
        entity=opts.get("wandb_entity"),
        tags=list(opts.get("wandb_tags") or []),
        offline=mode == "offline",
        mode=mode,
        log_model=log_model,
        **extra,
    )
    # Lightning passes `anonymous=None` to wandb.init, which warns about it on every run; the
    # keyword cannot be left out through WandbLogger's arguments, only from the dict of init
    # arguments it keeps (pinned by tests/test_library_internals.py).
    logger._wandb_init.pop("anonymous", None)
    return logger


class ConfigToWandb(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and records the full config in the W&B run.

    Attributes:
        wandb_runs: ``(W&B run directory, run id)`` of each W&B run it wrote to (rank 0).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As `SaveConfigCallback`."""
        super().__init__(*args, **kwargs)
        self.wandb_runs: list[tuple[Path, str]] = []

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Adds the resolved CLI config under the key ``cli`` of every W&B run's config."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.config.update({"cli": config}, allow_val_change=True)
                self.wandb_runs.append((Path(run.dir).parent, str(logger.version)))


def finish_wandb(exit_code: int) -> None:
    """Finishes the W&B run of this process, if one is open, with ``exit_code``."""
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
