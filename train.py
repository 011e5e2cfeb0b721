"""Training entry point: ``python train.py [fit|validate|test|predict] [--config cfg] [flags]``.

With no arguments at all, ``python train.py`` trains the default MLP (``configs/default.yaml``) on
the curve task, on a GPU if there is one, and prints where its results went. Every option of the
trainer, the model (`fusedce.lightning_modules.Classifier`) and the data module (any class of
`fusedce.datamodules`) can be set from YAML (``--config``) or flags; see
``python train.py fit --help``.

Results of each run go to ``<runs root>/<run name>/`` (root: ``--run.root``, env
``FUSEDCE_RUNS_DIR``, default ``./runs``)::

    config.yaml               the full resolved configuration
    checkpoints/              best and last checkpoints (ModelCheckpoint)
    wandb/                    the W&B run (offline unless W&B is configured)
    metrics.json              final metrics of the run (also after Ctrl-C / SIGTERM)
    metrics.csv               all logged metrics, only with --run.wandb_mode disabled
    decision_boundary.png     learned vs true boundary (curve task, fit only)
    predictions.pt            inputs, targets, predicted classes, confidences (predict only)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import inspect
import logging
import os
import re
import sys
import threading
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from fusedce.lightning_modules import (
    Classifier,
    DecisionBoundaryPlot,
    LastCheckpointOnInterrupt,
    PredictionWriter,
    RunSummary,
)

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_HELP_FLAGS = ("-h", "--help", "--version")
# Set by the process that picked the run directory, so that DDP worker processes launched by
# Lightning (which re-run this script) write into the same directory.
_RUN_DIR_ENV = "_FUSEDCE_RUN_DIR"
_RUN_DIR_PID_ENV = "_FUSEDCE_RUN_DIR_PID"
_WANDB_MODE_ENV = "_FUSEDCE_WANDB_MODE"  # rank 0's W&B decision, for its DDP workers
_LINKED = ("in_features", "num_classes")
# Model hyperparameters that shape the weights: a checkpoint's values cannot be overridden.
_ARCHITECTURE = ("hidden_sizes", "activation", "batch_norm", "init")
_DESCRIPTION = (
    "Trains and evaluates fusedce's Classifier: train.py [fit|validate|test|predict] "
    "[--config cfg.yaml] [flags]; without a subcommand it runs fit. "
    "`train.py fit --help` lists every flag."
)
_CKPT_RUN_KEY = "fusedce_run"  # checkpoint entry with the run directory and W&B run id
_DEFAULT_WANDB_URL = "https://api.wandb.ai"
# Third-party messages that every run would print and that say nothing about this run.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*The anonymous setting has no effect.*",
)


@dataclass
class RunOptions:
    """Where a run's results go and how it is tracked.

    Args:
        root: Parent directory of the run directories (default: env ``FUSEDCE_RUNS_DIR`` or
            ``runs``). Ignored if ``trainer.default_root_dir`` is set: that is the run directory.
        name: Name of the run directory and W&B run (default: ``<timestamp>-<subcommand>-<id>``,
            or ``<subcommand>-job<id>`` under SLURM / torchrun so that all processes agree).
        wandb_project: W&B project.
        wandb_entity: W&B entity (user or team); default: yours.
        wandb_mode: ``auto`` = offline unless W&B is configured (``WANDB_MODE`` set, or
            ``WANDB_API_KEY`` set -> online); or force ``online``, ``offline``, ``disabled``
            (``disabled``: metrics go to ``metrics.csv`` in the run directory instead).
        wandb_tags: Tags of the W&B run.
        wandb_timeout: Seconds an online run waits for the W&B server (``WANDB_BASE_URL``) to
            answer; if it does not, the run logs offline and says how to upload it later.
        wandb_resume: ``fit --ckpt_path`` continues the checkpoint's W&B run (same run id);
            false = a new W&B run.
        wandb_log_model: Upload checkpoints as W&B artifacts (``WandbLogger(log_model=...)``):
            ``false``, ``true`` (at the end of fit) or ``all`` (every checkpoint).
        plot: Save and log the decision-boundary picture at the end of ``fit`` (curve task).
        cpu_overrides: Config values (dotted keys, e.g. ``data.init_args.vocab_size``) that
            replace the configured ones when the run has no GPU; set by GPU-sized presets such as
            ``configs/large_vocab.yaml``. Flags given on the command line win; ``{}`` = none.
    """

    root: str | None = None
    name: str | None = None
    wandb_project: str = "fusedce"
    wandb_entity: str | None = None
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_tags: list[str] = field(default_factory=list)
    wandb_timeout: float = 10.0
    wandb_resume: bool = True
    wandb_log_model: bool | Literal["all"] = False
    plot: bool = True
    cpu_overrides: dict[str, Any] = field(default_factory=dict)


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
            result.append(f"{type(reason).__name__}: {reason}" if str(reason) else repr(reason))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return f"no answer from {url} within {timeout:g} s"
    return None if result[0] is None else f"{url}: {result[0]}"


class TrainError(Exception):
    """A configuration problem that ends the run with one line on stderr and exit code 2."""


class ConfigToWandb(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and records the full config in the W&B run."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Adds the resolved CLI config under the key ``cli`` of every W&B run's config."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": config}, allow_val_change=True)


class RunInfoInCheckpoint(Callback):
    """Stores the run directory and W&B run id in every checkpoint (for resuming the W&B run)."""

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        """Adds ``checkpoint["fusedce_run"] = {"run_dir": ..., "wandb_id": ...}``."""
        info: dict[str, Any] = {"run_dir": str(trainer.default_root_dir)}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                info["wandb_id"] = str(logger.version)
        checkpoint[_CKPT_RUN_KEY] = info


class FusedCEParser(LightningArgumentParser):
    """Parser whose errors are one line and a hint to ``--help`` (not a screen of usage)."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        """Prints ``<prog>: error: <message>`` and where the usage is, then exits with code 2."""
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        msg = " ".join(_clean_error(message).split())
        if re.search(r"--(optimizer|lr_scheduler)\b", msg):
            msg += " (set them on the model: --model.optimizer, --model.lr_scheduler)"
        sys.stderr.write(f"{prog}: error: {msg}\n")
        sys.stderr.write(f"{prog}: the options are listed by `{prog} --help`\n")
        raise SystemExit(2)


class FusedCECLI(LightningCLI):
    """LightningCLI with run directories, a W&B default logger and data -> model links."""

    run_dir: Path | None = None
    wandb_mode: str | None = None  # the mode W&B runs in (after an unreachable server: offline)
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when fit was stopped by a signal
    _ckpt: dict[str, Any] | None = None  # the --ckpt_path checkpoint, when one is given

    def __init__(self, *args: Any, cli_args: list[str] | None = None, **kwargs: Any) -> None:
        """As `LightningCLI`; ``cli_args`` are the command-line arguments (explicit flags)."""
        self._cli_args = list(cli_args or [])
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Adds ``--run.*`` and links the data module's sizes to the model."""
        parser.add_class_arguments(RunOptions, "run")
        for key in _LINKED:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Adds the subcommands; ``--help`` says that ``fit`` is the default (`main` adds it)."""
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        if action is not None:  # `main` always passes one: not "(required)" for the user
            action.help = "(default: fit)"
            action.required = False
            if hasattr(action, "_required"):  # where older jsonargparse releases read it
                action._required = False

    def _fail(self, message: str) -> None:
        """Ends the run: one line ``train.py <subcommand>: error: <message>``, exit code 2."""
        prog = f"train.py {self.subcommand}" if getattr(self, "subcommand", None) else "train.py"
        sys.stderr.write(f"{prog}: error: {message}\n")
        raise SystemExit(2)

    # ------------------------------------------------------------------------------ checkpoint
    def _parse_ckpt_path(self) -> None:
        """Reads ``--ckpt_path``: checks it, and takes the model settings it was trained with.

        Explicit settings (flags or ``--config`` files beyond ``configs/default.yaml``) that differ
        from the checkpoint's are applied where that is meaningful (loss options, dropout,
        regularisation, scheduler settings) and refused for the architecture (`_ARCHITECTURE`):
        the weights are for the checkpoint's network.
        """
        sub = self.config.get("subcommand")
        if not sub:
            return
        self.subcommand = sub
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        path = Path(ckpt_path)
        if not path.is_file():
            self._fail(f"--ckpt_path {ckpt_path}: no such file")
        try:
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:
            self._fail(f"--ckpt_path {ckpt_path}: not a readable checkpoint ({err})".split("\n")[0])
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            self._fail(f"--ckpt_path {ckpt_path}: not a Lightning checkpoint (no state_dict)")
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        accepted = set(inspect.signature(Classifier.__init__).parameters) - {"self"}
        foreign = sorted(set(hparams) - accepted)
        if (class_path and not class_path.endswith(".Classifier")) or foreign:
            what = class_path or "a model with hyperparameters " + ", ".join(foreign)
            self._fail(
                f"--ckpt_path {ckpt_path}: saved by {what}, not by "
                "fusedce.lightning_modules.Classifier"
            )
        explicit = self._explicit_model_values(sub)
        conflicts = {
            key: (explicit[key], hparams[key])
            for key in explicit
            if key in hparams and key not in _LINKED and explicit[key] != hparams[key]
        }
        refused = [key for key in conflicts if key in _ARCHITECTURE]
        if refused:
            given = ", ".join(
                f"--model.{k} {conflicts[k][0]!r} (checkpoint: {conflicts[k][1]!r})"
                for k in refused
            )
            self._fail(
                f"{given}: the checkpoint's weights are for its own network; drop the "
                "setting (or its --config) to use the checkpoint"
            )
        for key in conflicts:
            hparams.pop(key)
        if conflicts:
            applied = ", ".join(
                f"--model.{k} {v[0]!r} (checkpoint: {v[1]!r})" for k, v in conflicts.items()
            )
            sys.stderr.write(f"train.py {sub}: applied over the checkpoint's settings: {applied}\n")
        self._ckpt = ckpt
        if hparams:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

    def _explicit_model_values(self, sub: str) -> dict[str, Any]:
        """Model settings that differ from the defaults (parser defaults + default.yaml)."""
        base = self.parser.parse_args([sub, "--config", str(DEFAULT_CONFIG)])
        given, default = self.config[sub].get("model"), base[sub].get("model")
        out = {}
        for key in inspect.signature(Classifier.__init__).parameters:
            if given is None or key not in given:
                continue
            value = given[key]
            if default is None or key not in default or value != default[key]:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def _check_ckpt_fits_model(self) -> None:
        """Refuses a checkpoint whose weights do not fit the instantiated model (one line)."""
        if self._ckpt is None or not isinstance(self.model, Classifier):
            return
        state = dict(self._ckpt["state_dict"])
        self.model.on_load_checkpoint({"state_dict": state})
        own = self.model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
        if not (missing or unexpected or wrong):
            return
        hp = dict(self._ckpt.get("hyper_parameters") or {})
        flags = [
            f"--data.{k} {self.model.hparams[k]} (checkpoint: {hp[k]})"
            for k in _LINKED
            if k in hp and hp[k] != self.model.hparams[k]
        ]
        detail = "; ".join(
            [
                f"size mismatch for {k}: {tuple(state[k].shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the model"
                for k in wrong[:2]
            ]
            + ([f"missing {', '.join(missing[:3])}"] if missing else [])
            + ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        )
        prefix = ", ".join(flags) + ": " if flags else ""
        self._fail(f"{prefix}the checkpoint's weights do not fit the model: {detail}")

    # ------------------------------------------------------------------------------ checks
    def before_instantiate_classes(self) -> None:
        """Applies a preset's CPU sizes when there is no GPU; settles the W&B mode.

        Both happen before anything is instantiated or written, so that a missing W&B key is a
        one-line error that leaves nothing behind.
        """
        self._apply_cpu_overrides()
        self.wandb_mode = self._settle_wandb_mode()

    def _uses_gpu(self) -> bool:
        accelerator = str(self.config[self.subcommand].get("trainer", {}).get("accelerator"))
        if accelerator == "cpu":
            return False
        if accelerator in ("auto", "gpu", "cuda", "None"):
            return torch.cuda.is_available()
        return True  # mps, tpu, a custom accelerator: treat it as the preset's target

    def _apply_cpu_overrides(self) -> None:
        cfg = self.config[self.subcommand]
        overrides = dict(cfg.get("run", {}).get("cpu_overrides") or {})
        if not overrides or self._uses_gpu():
            return
        given = {a.split("=")[0].replace(".init_args.", ".") for a in self._cli_args}
        applied = []
        for key, value in overrides.items():
            if f"--{key.replace('.init_args.', '.')}" in given:
                continue  # an explicit flag wins
            try:
                cfg[key] = value
            except Exception as err:  # a key that is not in the config
                self._fail(f"run.cpu_overrides: cannot set {key}: {err}")
            applied.append(f"{key.replace('.init_args.', '.')}={value}")
        if applied:
            print(
                "train.py: no GPU: this preset is sized for one; running its CPU size: "
                + " ".join(applied)
                + " (--run.cpu_overrides '{}' keeps the full size)",
                flush=True,
            )

    def _settle_wandb_mode(self) -> str | None:
        """``online`` / ``offline`` / ``disabled`` for the default W&B logger (None: not used)."""
        cfg = self.config[self.subcommand]
        if cfg.get("trainer", {}).get("logger") not in (None, True):
            return None  # logger false or a configured logger: not this CLI's W&B
        inherited = os.environ.get(_WANDB_MODE_ENV)
        is_worker = os.environ.get("LOCAL_RANK", "0") != "0"
        if inherited and is_worker and os.environ.get(_RUN_DIR_PID_ENV) == str(os.getppid()):
            return inherited
        opts = cfg.get("run", {})
        mode = resolve_wandb_mode(opts.get("wandb_mode") or "auto")
        if mode == "online":
            if not wandb_has_credentials():
                self._fail(
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
        os.environ[_WANDB_MODE_ENV] = mode
        return mode

    def instantiate_classes(self) -> None:
        """Instantiates data, model and trainer; a bad value exits with a one-paragraph error."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            msg = _clean_error(str(err))
            sys.stderr.write(f"train.py {self.subcommand}: error: invalid configuration: {msg}\n")
            raise SystemExit(2) from err

    def _check_optimization(self) -> None:
        """Builds the optimizer and scheduler once (and steps the scheduler) on a throwaway
        optimizer, so that a value they reject is an error now, not after the run started."""
        model = self.model
        if not isinstance(model, Classifier) or self.subcommand != "fit":
            return
        model_cfg = self.config[self.subcommand].get("model", {})
        section, configured = "optimizer", model_cfg.get("optimizer")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                optimizer = model.optimizer_factory(model.parameters())
                if model.lr_scheduler_factory is not None:
                    section, configured = "lr_scheduler", model_cfg.get("lr_scheduler")
                    scheduler = model.lr_scheduler_factory(optimizer)
                    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        scheduler.step(1.0)
                    else:
                        scheduler.step()
        except Exception as err:
            self._fail(_optim_error(section, configured, err))

    # ------------------------------------------------------------------------------ run dir
    def _section(self, key: str, default: Any = None) -> Any:
        """The instantiated ``key`` section of the config (of the running subcommand)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config.get(key, default)

    def _run_options(self) -> dict[str, Any]:
        opts = self._section("run")
        if isinstance(opts, RunOptions):
            return dataclasses.asdict(opts)
        return dict(opts or {})

    def _choose_run_dir(self, opts: dict[str, Any], trainer_cfg: dict[str, Any]) -> Path:
        if trainer_cfg.get("default_root_dir"):
            return Path(trainer_cfg["default_root_dir"])
        inherited = os.environ.get(_RUN_DIR_ENV)
        is_worker = os.environ.get("LOCAL_RANK", "0") != "0"
        if inherited and is_worker and os.environ.get(_RUN_DIR_PID_ENV) == str(os.getppid()):
            return Path(inherited)
        root = Path(opts.get("root") or os.environ.get("FUSEDCE_RUNS_DIR") or "runs")
        name = opts.get("name")
        if not name:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
            if job and job != "none":  # identical in every process of the job, on every node
                name = f"{self.subcommand}-job{job}"
            else:
                name = f"{stamp}-{self.subcommand}-{uuid.uuid4().hex[:6]}"
        run_dir = (root / name).resolve()
        os.environ[_RUN_DIR_ENV] = str(run_dir)
        os.environ[_RUN_DIR_PID_ENV] = str(os.getpid())
        return run_dir

    def _resumed_wandb_id(self) -> str | None:
        """The W&B run id of the checkpoint that ``fit --ckpt_path`` resumes (None: none)."""
        if self.subcommand != "fit" or self._ckpt is None:
            return None
        info = self._ckpt.get(_CKPT_RUN_KEY) or {}
        if info.get("wandb_id"):
            return str(info["wandb_id"])
        # checkpoints written without that entry: <run dir>/checkpoints/x.ckpt, <run dir>/wandb/
        ckpt_path = Path(self.config[self.subcommand]["ckpt_path"]).resolve()
        runs = sorted(ckpt_path.parent.parent.glob("wandb/*run-*-*"))
        return runs[-1].name.rsplit("-", 1)[-1] if runs else None

    def _make_logger(self, configured: Any, opts: dict[str, Any], run_dir: Path) -> Any:
        if configured is False or isinstance(configured, Logger | list):
            return configured
        mode = self.wandb_mode or resolve_wandb_mode(opts.get("wandb_mode", "auto"))
        if mode == "disabled":  # no W&B: keep the metrics as CSV in the run directory
            return CSVLogger(save_dir=str(run_dir), name="", version="")
        extra: dict[str, Any] = {}
        log_model = opts.get("wandb_log_model", False)
        if log_model and mode != "online":  # Lightning refuses log_model in offline mode
            print(
                "train.py: --run.wandb_log_model is not used: W&B is offline (the checkpoints "
                "stay in the run directory)",
                flush=True,
            )
            log_model = False
        wandb_id = self._resumed_wandb_id() if opts.get("wandb_resume", True) else None
        if wandb_id:
            extra = {"id": wandb_id, "resume": "allow"}
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
        # Lightning passes anonymous=None, which wandb warns about on every run.
        logger._wandb_init.pop("anonymous", None)
        return logger

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Builds the trainer with the run directory, W&B logger and the stack's callbacks.

        Everything before this point only validates and instantiates; the run directory is
        created only once the trainer exists, so a bad configuration leaves nothing on disk.
        """
        # What is otherwise checked only when used, while nothing is on disk yet.
        self._check_optimization()
        self._check_ckpt_fits_model()
        trainer_cfg = dict(self._section("trainer", {}))
        opts = self._run_options()
        run_dir = self._choose_run_dir(opts, trainer_cfg)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        for cb in callbacks:
            # Checked at validation ends only: a run that stops mid-epoch (max_steps, max_time)
            # before any validation would otherwise fail on the missing metric at epoch end.
            if isinstance(cb, EarlyStopping) and cb._check_on_train_epoch_end is None:
                cb._check_on_train_epoch_end = False
        extra: list[Any] = [RunSummary(), RunInfoInCheckpoint()]
        if self.subcommand == "fit":
            extra.append(LastCheckpointOnInterrupt())
            if opts.get("plot", True):
                extra.append(DecisionBoundaryPlot())
        if self.subcommand == "predict":
            extra.append(PredictionWriter())
        wants_bar = trainer_cfg.get("enable_progress_bar") is not False
        has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if wants_bar and not has_bar and importlib.util.find_spec("rich") is not None:
            from lightning.pytorch.callbacks import RichProgressBar

            extra.append(RichProgressBar())
        logger = kwargs.setdefault(
            "logger", self._make_logger(trainer_cfg.get("logger"), opts, run_dir)
        )
        if logger is False:  # LearningRateMonitor would fail at fit start without a logger
            dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
            if dropped:
                rank_zero_warn("trainer.logger is false: LearningRateMonitor is left out")
        kwargs.setdefault("callbacks", callbacks + extra)
        kwargs.setdefault("default_root_dir", str(run_dir))
        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(run_dir / "checkpoints")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Runs the subcommand; an interrupted fit (SIGINT / SIGTERM) still reports its results.

        Lightning shuts an interrupted run down gracefully (callbacks' ``on_exception``: the
        metrics file and ``last.ckpt``) and then exits; here that exit is turned back into a
        normal return with `interrupted` set, so that `main` can report and close W&B.
        """
        try:
            super()._run_subcommand(subcommand)
        except SystemExit as err:
            trainer = getattr(self, "trainer", None)
            if trainer is None or not trainer.interrupted:
                raise
            self.interrupted = "SIGTERM" if isinstance(err, SIGTERMException) else "SIGINT"

    def report(self) -> str:
        """Human-readable summary of where this run's results are."""
        trainer = self.trainer
        lines = [f"Results of `{self.subcommand}`:", f"  run dir:     {self.run_dir}"]
        if self.interrupted:
            lines[0] = (
                f"Results of `{self.subcommand}` (interrupted by {self.interrupted} at step "
                f"{trainer.global_step}; resume with --ckpt_path <last ckpt>):"
            )
        lines.append(f"  config:      {self.run_dir / 'config.yaml'}")
        for logger in trainer.loggers:
            # ConfigToWandb has started every W&B run at setup: `experiment` starts no new one.
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                files_dir = Path(logger.experiment.dir)
                mode = self.wandb_mode or resolve_wandb_mode(
                    self._run_options().get("wandb_mode", "auto")
                )
                lines.append(f"  W&B run dir: {files_dir.parent}  ({mode}, id {logger.version})")
                if mode == "offline":
                    lines.append(f"               upload later with: wandb sync {files_dir.parent}")
        ckpt = trainer.checkpoint_callback
        if self.subcommand == "fit" and ckpt is not None:
            lines.append(f"  checkpoint:  {getattr(ckpt, 'best_model_path', '') or '(none)'}")
            last = getattr(ckpt, "last_model_path", "")
            if last:
                lines.append(f"  last ckpt:   {last}")
        for cb in trainer.callbacks:
            if isinstance(cb, DecisionBoundaryPlot) and cb.path is not None:
                lines.append(f"  plot:        {cb.path}")
            if isinstance(cb, PredictionWriter) and cb.path is not None:
                lines.append(f"  predictions: {cb.path}")
        lines.append(f"  metrics:     {self.run_dir / 'metrics.json'}")
        shown = ("val/acc", "val/acc_best", "val/loss", "test/acc", "test/loss")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in shown}
        if metrics:
            lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return "\n".join(lines)


def _optim_error(section: str, configured: Any, err: Exception) -> str:
    """One line naming the ``--model.<section>.<arg>`` flag that the optimizer/scheduler rejects.

    The flag is the init argument named in the message (torch says "learning rate" for ``lr``);
    a ``ZeroDivisionError`` points at the arguments that are 0 (e.g. ``T_max``).
    """
    class_path = str(getattr(configured, "class_path", "") or "")
    init_args = dict(getattr(configured, "init_args", None) or {})
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    names = [k for k in init_args if re.search(rf"\b{re.escape(k)}\b", text)]
    if not names and "learning rate" in text and "lr" in init_args:
        names = ["lr"]
    if not names and isinstance(err, ZeroDivisionError):  # a zero count first (T_max 0)
        zeros = [k for k, v in init_args.items() if isinstance(v, int | float) and v == 0]
        names = [k for k in zeros if isinstance(init_args[k], int)] or zeros
    flags = ", ".join(f"--model.{section}.{k} {init_args[k]!r}" for k in names)
    owner = class_path.rsplit(".", 1)[-1] or section
    return f"{flags or f'--model.{section}'}: {owner} rejects it ({type(err).__name__}: {text})"


def _clean_error(msg: str) -> str:
    """Reduces jsonargparse's "does not validate against any Union subtype" to the real cause."""
    if "Does not validate against any of the Union subtypes" not in msg:
        return msg
    causes = [
        line.strip()[2:]
        for line in msg.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    return "; ".join(causes) or msg


def with_default_subcommand(argv: list[str]) -> list[str]:
    """Prepends ``fit`` when the arguments start without a subcommand (``train.py [flags]``)."""
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in _HELP_FLAGS):
        return ["fit", *argv]
    return argv


def with_default_config(args: list[str]) -> list[str]:
    """Puts ``--config configs/default.yaml`` right after the subcommand (later args override it).

    (jsonargparse's ``default_config_files`` mis-parses callable class types such as the
    optimizer, so the default config is passed as the first ``--config`` instead.)
    """
    if args and args[0] in SUBCOMMANDS:
        return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]
    return args


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips (``💡 Tip: ...``) from its log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Filters the known third-party messages that every run prints (narrowly, by text)."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # LightningCLI warns when both `args` and sys.argv are given; here args IS sys.argv + config.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def main(args: list[str] | None = None) -> FusedCECLI:
    """Runs the CLI on ``args`` (default: ``sys.argv[1:]``) and prints where the results are.

    A fit stopped by SIGINT (Ctrl-C) or SIGTERM still writes ``metrics.json`` and ``last.ckpt``,
    closes the W&B run and prints the results; the process then exits with 130 / 143.

    Returns:
        The finished CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``, ``cli.run_dir``).
    """
    from_command_line = args is None
    if args is None:
        sys.argv[1:] = with_default_subcommand(sys.argv[1:])  # DDP workers re-run sys.argv
        args = sys.argv[1:]
    else:
        args = with_default_subcommand(list(args))
    quiet_known_noise()
    try:
        cli = FusedCECLI(
            Classifier,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=ConfigToWandb,
            parser_class=FusedCEParser,
            auto_configure_optimizers=False,  # the model's --model.optimizer / lr_scheduler
            parser_kwargs={"description": _DESCRIPTION},
            args=with_default_config(args),
            cli_args=args,
        )
    finally:  # the run-dir hand-over is for this run's DDP workers only
        if os.environ.get(_RUN_DIR_PID_ENV) == str(os.getpid()):
            for key in (_RUN_DIR_ENV, _RUN_DIR_PID_ENV, _WANDB_MODE_ENV):
                os.environ.pop(key, None)
    exit_code = {"SIGINT": 130, "SIGTERM": 143}.get(cli.interrupted or "", 0)
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except ImportError:  # pragma: no cover - wandb is a dependency
        pass
    if cli.trainer.is_global_zero and cli.run_dir is not None:
        print(cli.report(), flush=True)
    if exit_code and from_command_line:
        raise SystemExit(exit_code)
    return cli


if __name__ == "__main__":
    main()
