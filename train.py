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

This file holds the CLI class, which puts the pieces together, and `main`. The pieces live in
`fusedce.lightning_modules`: ``run_options`` (``--run.*``), ``run_dir``, ``wandb_setup``,
``checkpoints`` (``--ckpt_path``), ``optimizer_check``, ``cli_parser``, ``threads``, ``report``
and ``log_filters``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fusedce.lightning_modules import Classifier
from fusedce.lightning_modules.checkpoint_io import with_atomic_io
from fusedce.lightning_modules.checkpoints import (
    LIGHTNING_CKPT_NAMES,
    LINKED,
    check_fits_model,
    checkpoint_hparams,
    explicit_model_values,
    read_checkpoint,
    reconcile_hparams,
    resumed_wandb_id,
)
from fusedce.lightning_modules.cli_parser import (
    FusedCEParser,
    clean_error,
    subcommand_optional_in_help,
)
from fusedce.lightning_modules.errors import TrainError
from fusedce.lightning_modules.log_filters import quiet_known_noise
from fusedce.lightning_modules.optimizer_check import check_optimization
from fusedce.lightning_modules.report import run_report
from fusedce.lightning_modules.run_dir import choose_run_dir, end_hand_over
from fusedce.lightning_modules.run_options import RunOptions, apply_cpu_overrides, run_options_dict
from fusedce.lightning_modules.stack_callbacks import (
    early_stopping_at_validation_ends,
    stack_callbacks,
)
from fusedce.lightning_modules.threads import set_threads
from fusedce.lightning_modules.wandb_setup import (
    ConfigToWandb,
    finish_wandb,
    make_logger,
    resolve_wandb_mode,
    settle_wandb_mode,
)

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOOLS = ("lr_find", "tune")  # built on `fit`: the learning-rate range test, the search
_HELP_FLAGS = ("-h", "--help", "--version")
_DESCRIPTION = (
    "Trains and evaluates fusedce's Classifier: train.py [fit|validate|test|predict] "
    "[--config cfg.yaml] [flags]; without a subcommand it runs fit. "
    "`train.py fit --help` lists every flag. Choosing hyperparameters: "
    "`train.py lr_find --help`, `train.py tune --help`."
)
_FULL = "(the preset is sized for a GPU; --run.cpu_overrides '{}' keeps the full size)"
# Exit codes of a run that a signal stopped (the shell's 128 + signal number).
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


class FusedCECLI(LightningCLI):
    """LightningCLI with run directories, a W&B default logger and data -> model links.

    Attributes:
        run_dir: The run directory (set once the trainer exists).
        wandb_mode: The mode W&B runs in (after an unreachable server: offline); None where the
            default logger is not used.
        interrupted: ``"SIGINT"`` / ``"SIGTERM"`` when fit was stopped by a signal.
        ckpt: The ``--ckpt_path`` checkpoint, when one is given.
        threads: torch's CPU thread count of the run and why (`threads.set_threads`).
    """

    run_dir: Path | None = None
    threads: str | None = None
    wandb_mode: str | None = None
    interrupted: str | None = None
    ckpt: dict[str, Any] | None = None

    def __init__(self, *args: Any, cli_args: list[str] | None = None, **kwargs: Any) -> None:
        """As `LightningCLI`; ``cli_args`` are the command-line arguments (explicit flags)."""
        self._cli_args = list(cli_args or [])
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Adds ``--run.*`` and links the data module's sizes to the model."""
        parser.add_class_arguments(RunOptions, "run")
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """As `LightningCLI`; ``--help`` says that ``fit`` is the default (`main` adds it)."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        subcommand_optional_in_help(self.parser, "fit")

    def _parse_ckpt_path(self) -> None:
        """Reads ``--ckpt_path``: checks it, and takes the model settings it was trained with
        where no explicit setting replaces them (`checkpoints.reconcile_hparams`).

        Replaces Lightning's private hook of the same name, which ``LightningCLI.__init__``
        calls right after parsing and which would apply the checkpoint's settings over every
        explicit one, unchecked (pinned by tests/test_library_internals.py).
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES:
            return
        self.ckpt = read_checkpoint(ckpt_path)
        explicit = self._explicit_model_values(sub)
        kept, applied = reconcile_hparams(checkpoint_hparams(self.ckpt), explicit)
        if applied:
            sys.stderr.write(f"train.py {sub}: {applied}\n")
        if kept:
            self.config = self.parser.parse_object({sub: {"model": kept}}, self.config)

    def _explicit_model_values(self, sub: str) -> dict[str, Any]:
        """Model settings that differ from the defaults (parser defaults + default.yaml)."""
        base = self.parser.parse_args([sub, "--config", str(DEFAULT_CONFIG)])
        return explicit_model_values(self.config[sub].get("model"), base[sub].get("model"))

    def before_instantiate_classes(self) -> None:
        """Applies a preset's CPU sizes when there is no GPU; settles the W&B mode.

        Both happen before anything is instantiated or written, so that a missing W&B key is a
        one-line error that leaves nothing behind.
        """
        config = self.config[self.subcommand]
        applied = apply_cpu_overrides(config, self._cli_args)
        if applied and rank_zero_only.rank == 0:  # DDP workers re-run this: say it once
            sizes = " ".join(applied)
            print(f"train.py: no GPU: running this preset's CPU size: {sizes} {_FULL}", flush=True)
        trainer_cfg = config.get("trainer", {})
        self.wandb_mode = settle_wandb_mode(config.get("run", {}), trainer_cfg.get("logger"))
        early_stopping_at_validation_ends(trainer_cfg.get("callbacks"))

    def instantiate_classes(self) -> None:
        """Instantiates data, model and trainer; a bad value is a one-line `TrainError`."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            raise TrainError(f"invalid configuration: {clean_error(str(err))}") from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Builds the trainer with the run directory, W&B logger and the stack's callbacks.

        Everything before this point only validates and instantiates; the run directory is
        created only once the trainer exists, so a bad configuration leaves nothing on disk.
        """
        sub, config = self.subcommand, self.config_init[self.subcommand]
        if isinstance(self.model, Classifier):  # what is otherwise checked only when used
            if sub == "fit":
                check_optimization(self.model, self.config[sub].get("model", {}))
            if self.ckpt is not None:
                check_fits_model(self.ckpt, self.model)
        trainer_cfg = dict(config.get("trainer", {}))
        opts = run_options_dict(config.get("run"))
        self.threads = set_threads(opts.get("threads"), self.model)
        run_dir = choose_run_dir(opts, trainer_cfg, sub)
        configured = list(trainer_cfg.get("callbacks") or [])
        resume_id = None
        if sub == "fit" and self.ckpt is not None and opts.get("wandb_resume", True):
            resume_id = resumed_wandb_id(self.ckpt, config["ckpt_path"])
        mode = self.wandb_mode or resolve_wandb_mode(opts.get("wandb_mode", "auto"))
        logger = make_logger(trainer_cfg.get("logger"), opts, run_dir, mode, resume_id)
        kwargs.setdefault("logger", logger)
        trainer_cfg["logger"] = kwargs["logger"]
        kwargs.setdefault("callbacks", stack_callbacks(sub, configured, opts, trainer_cfg))
        kwargs.setdefault("default_root_dir", str(run_dir))
        kwargs.setdefault("plugins", with_atomic_io(trainer_cfg.get("plugins")))
        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", "") is None:
                cb.dirpath = str(run_dir / "checkpoints")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Runs the subcommand; an interrupted fit (SIGINT / SIGTERM) still reports its results.

        Lightning shuts an interrupted run down gracefully (callbacks' ``on_exception``: the
        metrics file and ``last.ckpt``) and then exits; here that exit is turned back into a
        normal return with `interrupted` set, so that `main` can report and close W&B. Wraps
        Lightning's private runner of the subcommand, the one place where that exit can be
        caught with the CLI still at hand (pinned by tests/test_library_internals.py).
        """
        try:
            super()._run_subcommand(subcommand)
        except SystemExit as err:
            trainer = getattr(self, "trainer", None)
            if trainer is None or not trainer.interrupted:
                raise
            self.interrupted = "SIGTERM" if isinstance(err, SIGTERMException) else "SIGINT"

    def report(self) -> str:
        """Human-readable summary of where this run's results are (`report.run_report`)."""
        run = run_options_dict(self.config_init[self.subcommand].get("run"))
        mode = self.wandb_mode or resolve_wandb_mode(run.get("wandb_mode", "auto"))
        args = (self.subcommand, self.run_dir, mode, self.interrupted, self.threads)
        return run_report(self.trainer, *args)


def with_default_subcommand(argv: list[str]) -> list[str]:
    """Prepends ``fit`` when the arguments start without a subcommand (``train.py [flags]``)."""
    if not argv or (argv[0] not in SUBCOMMANDS + TOOLS and argv[0] not in _HELP_FLAGS):
        return ["fit", *argv]
    return argv


def with_default_config(args: list[str]) -> list[str]:
    """Puts ``--config configs/default.yaml`` right after the subcommand (later args override it):
    jsonargparse's ``default_config_files`` mis-parses callable class types (the optimizer)."""
    if args and args[0] in SUBCOMMANDS:
        return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]
    return args


def main(args: list[str] | None = None, cli_class: type[FusedCECLI] = FusedCECLI) -> Any:
    """Runs the CLI on ``args`` (default: ``sys.argv[1:]``) and prints where the results are.

    A fit stopped by SIGINT (Ctrl-C) or SIGTERM still writes ``metrics.json`` and ``last.ckpt``,
    closes the W&B run and prints the results; the process then exits with 130 / 143. A
    `TrainError` (a bad setting or file) is one line on stderr and exit code 2.
    ``lr_find`` and ``tune`` go to `fusedce.lightning_modules.tools` (on ``cli_class``).

    Returns:
        The finished CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``, ``cli.run_dir``);
        for ``lr_find`` / ``tune``, what `tools.run_tool` returns.
    """
    from_command_line = args is None
    if args is None:
        sys.argv[1:] = with_default_subcommand(sys.argv[1:])  # DDP workers re-run sys.argv
        args = sys.argv[1:]
    else:
        args = with_default_subcommand(list(args))
    if args[0] in TOOLS:  # imported here: optuna and the tools cost a plain run nothing
        from fusedce.lightning_modules.tools import run_tool

        return run_tool(args, fit_main=main, cli_class=cli_class, script=Path(__file__))
    quiet_known_noise()
    try:
        cli = cli_class(
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
    except TrainError as err:
        finish_wandb(err.exit_code)
        sys.stderr.write(f"train.py {args[0]}: error: {err}\n")
        raise SystemExit(err.exit_code) from None
    finally:  # the run-dir hand-over is for this run's DDP workers only
        end_hand_over()
    exit_code = _SIGNAL_EXIT.get(cli.interrupted or "", 0)
    finish_wandb(exit_code)
    if cli.trainer.is_global_zero and cli.run_dir is not None:
        print(cli.report(), flush=True)
    if exit_code and from_command_line:
        raise SystemExit(exit_code)
    return cli


if __name__ == "__main__":
    main()
