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
    metrics.json              final metrics of the run
    metrics.csv               all logged metrics, only with --run.wandb_mode disabled
    decision_boundary.png     learned vs true boundary (curve task, fit only)
    predictions.pt            predicted classes and confidences (predict only)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import os
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from fusedce.lightning_modules import Classifier, DecisionBoundaryPlot, PredictionWriter, RunSummary

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_HELP_FLAGS = ("-h", "--help", "--version")
# Set by the process that picked the run directory, so that DDP worker processes launched by
# Lightning (which re-run this script) write into the same directory.
_RUN_DIR_ENV = "_FUSEDCE_RUN_DIR"
_RUN_DIR_PID_ENV = "_FUSEDCE_RUN_DIR_PID"
_LINKED = ("in_features", "num_classes")


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
        plot: Save and log the decision-boundary picture at the end of ``fit`` (curve task).
    """

    root: str | None = None
    name: str | None = None
    wandb_project: str = "fusedce"
    wandb_entity: str | None = None
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_tags: list[str] = field(default_factory=list)
    plot: bool = True


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


class ConfigToWandb(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and records the full config in the W&B run."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Adds the resolved CLI config under the key ``cli`` of every W&B run's config."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": config}, allow_val_change=True)


class FusedCECLI(LightningCLI):
    """LightningCLI with run directories, a W&B default logger and data -> model links."""

    run_dir: Path | None = None

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Adds ``--run.*`` and links the data module's sizes to the model."""
        parser.add_class_arguments(RunOptions, "run")
        for key in _LINKED:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        """Instantiates data, model and trainer; a bad value exits with a one-paragraph error."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            msg = _clean_error(str(err))
            sys.stderr.write(f"train.py {self.subcommand}: error: invalid configuration: {msg}\n")
            raise SystemExit(2) from err

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

    def _make_logger(self, configured: Any, opts: dict[str, Any], run_dir: Path) -> Any:
        if configured is False or isinstance(configured, Logger | list):
            return configured
        mode = resolve_wandb_mode(opts.get("wandb_mode", "auto"))
        if mode == "disabled":  # no W&B: keep the metrics as CSV in the run directory
            return CSVLogger(save_dir=str(run_dir), name="", version="")
        return WandbLogger(
            name=run_dir.name,
            save_dir=str(run_dir),
            project=opts.get("wandb_project") or "fusedce",
            entity=opts.get("wandb_entity"),
            tags=list(opts.get("wandb_tags") or []),
            offline=mode == "offline",
            mode=mode,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Builds the trainer with the run directory, W&B logger and the stack's callbacks.

        Everything before this point only validates and instantiates; the run directory is
        created only once the trainer exists, so a bad configuration leaves nothing on disk.
        """
        trainer_cfg = dict(self._section("trainer", {}))
        opts = self._run_options()
        run_dir = self._choose_run_dir(opts, trainer_cfg)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        extra: list[Any] = [RunSummary()]
        if self.subcommand == "fit" and opts.get("plot", True):
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

    def report(self) -> str:
        """Human-readable summary of where this run's results are."""
        trainer = self.trainer
        lines = [f"Results of `{self.subcommand}`:", f"  run dir:     {self.run_dir}"]
        lines.append(f"  config:      {self.run_dir / 'config.yaml'}")
        for logger in trainer.loggers:
            # ConfigToWandb has started every W&B run at setup: `experiment` starts no new one.
            if isinstance(logger, WandbLogger):
                files_dir = Path(logger.experiment.dir)
                mode = resolve_wandb_mode(self._run_options().get("wandb_mode", "auto"))
                lines.append(f"  W&B run dir: {files_dir.parent}  ({mode})")
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


def main(args: list[str] | None = None) -> FusedCECLI:
    """Runs the CLI on ``args`` (default: ``sys.argv[1:]``) and prints where the results are.

    Returns:
        The finished CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``, ``cli.run_dir``).
    """
    if args is None:
        sys.argv[1:] = with_default_subcommand(sys.argv[1:])  # DDP workers re-run sys.argv
        args = sys.argv[1:]
    else:
        args = with_default_subcommand(list(args))
    # LightningCLI warns when both `args` and sys.argv are given; here args IS sys.argv + config.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        cli = FusedCECLI(
            Classifier,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=ConfigToWandb,
            args=with_default_config(args),
        )
    finally:  # the run-dir hand-over is for this run's DDP workers only
        if os.environ.get(_RUN_DIR_PID_ENV) == str(os.getpid()):
            os.environ.pop(_RUN_DIR_ENV, None)
            os.environ.pop(_RUN_DIR_PID_ENV, None)
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:  # pragma: no cover - wandb is a dependency
        pass
    if cli.trainer.is_global_zero and cli.run_dir is not None:
        print(cli.report(), flush=True)
    return cli


if __name__ == "__main__":
    main()
