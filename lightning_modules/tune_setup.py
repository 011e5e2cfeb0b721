"""The options of ``train.py tune`` and the checked setup of a study: everything decided
before a study or a trial is created (`prepare`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TrainError
from .run_dir import end_hand_over
from .run_options import run_options_dict
from .search_space import Param, load_space, param_flags
from .tools import FitMain, check_fit_args, flag_names, parse_fit, split_options, without_flag
from .wandb_setup import settle_wandb_mode

_CHOICES = {
    "direction": ("maximize", "minimize"),
    "pruner": ("median", "hyperband", "none"),
    "sampler": ("tpe", "random", "grid"),
}
# Flags that tune sets on every trial; the space cannot set them.
_RESERVED = ("run.root", "run.name", "trainer.default_root_dir")


@dataclass
class TuneOptions:
    """The ``--tune.*`` options.

    Args:
        space: The search space (YAML; `search_space`). Required.
        trials: Total number of trials wanted in the study (all runs of the command together).
        timeout: Seconds after which this process starts no new trial (None: no limit).
        study: The study's name: its directory under the runs root and its W&B group
            (default: the space file's name without extension).
        storage: Optuna storage: an RDB URL or a journal file path (default:
            ``<root>/<study>/optuna.journal``).
        metric: The validation metric to optimise.
        direction: ``maximize`` or ``minimize`` (default: minimize for a metric whose name
            contains ``loss``, else maximize).
        pruner: ``median``, ``hyperband`` or ``none``.
        sampler: ``tpe``, ``random`` or ``grid`` (every combination once; floats need a step).
        seed: Random seed of the sampler (None: drawn anew).
    """

    space: str | None = None
    trials: int = 20
    timeout: float | None = None
    study: str | None = None
    storage: str | None = None
    metric: str = "val/acc"
    direction: str | None = None
    pruner: str = "median"
    sampler: str = "tpe"
    seed: int | None = None


def parse_tune_options(raw: dict[str, str]) -> TuneOptions:
    """The ``--tune.*`` options from their command-line text.

    Raises:
        TrainError: One line naming the option: unknown, a bad number or choice, no space.
    """
    fields = {f.name for f in dataclasses.fields(TuneOptions)}
    values: dict[str, Any] = {}
    for name, text in raw.items():
        if name not in fields:
            raise TrainError(f"--tune.{name}: unknown option (options: {', '.join(fields)})")
        if name in ("trials", "seed"):
            try:
                values[name] = int(text)
            except ValueError:
                raise TrainError(f"--tune.{name}: expected an integer, got {text!r}") from None
        elif name == "timeout":
            try:
                values[name] = None if text in ("null", "none", "") else float(text)
            except ValueError:
                raise TrainError(f"--tune.timeout: expected seconds, got {text!r}") from None
        else:
            values[name] = text
        if name in _CHOICES and text not in _CHOICES[name]:
            raise TrainError(
                f"--tune.{name}: unknown {name} {text!r} (one of: {', '.join(_CHOICES[name])})"
            )
    opts = TuneOptions(**values)
    if not opts.space:
        raise TrainError(
            "--tune.space is required: a YAML file of flag names and ranges "
            "(e.g. configs/tune_curve.yaml)"
        )
    if opts.trials < 1:
        raise TrainError(f"--tune.trials: expected at least 1, got {opts.trials}")
    if opts.timeout is not None and not opts.timeout > 0:
        raise TrainError(f"--tune.timeout: expected seconds > 0, got {opts.timeout}")
    if opts.study is not None and (not opts.study or "/" in opts.study or opts.study[0] == "."):
        raise TrainError(f"--tune.study {opts.study!r}: expected a directory name")
    return opts


@dataclass
class Setup:
    """Everything a study run needs, checked before anything is created.

    Attributes:
        opts: The ``--tune.*`` options.
        params: The search space.
        fit_args: The ``fit`` flags every trial gets (the command line minus ``--tune.*``).
        study_name: The study's name (its directory and W&B group).
        study_dir: ``<runs root>/<study name>``.
        storage_url: The storage (`tune_trial.open_storage`).
        direction: ``maximize`` or ``minimize``.
        wandb: ``{"mode", "project", "entity", "auto"}`` of the trials' W&B runs (mode None:
            a configured ``trainer.logger`` instead of the default W&B logger).
        max_epochs: ``trainer.max_epochs`` (the hyperband pruner's largest budget).
        script: The path of ``train.py``.
        grid: The grid sampler's values by key (empty for the other samplers).
    """

    opts: TuneOptions
    params: list[Param]
    fit_args: list[str]
    study_name: str
    study_dir: Path
    storage_url: str
    direction: str
    wandb: dict[str, Any]
    max_epochs: int | None
    script: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def fit_command(self, values: dict[str, Any]) -> list[str]:
        """The ``fit`` arguments of a trial with parameters ``values`` (by key): the fit
        flags without those that the space sets, then the trial's."""
        names = tuple(n for p in self.params for n in flag_names(p.key))
        return ["fit", *without_flag(self.fit_args, names), *param_flags(self.params, values)]


def check_space(cli: Any, params: list[Param], fit_args: list[str]) -> None:
    """Checks every key of the space, with its bounds or choices, against ``fit``'s parser.

    All keys are checked together, in as many rounds as the key with the most probes
    (`Param.probes`) has; a round that fails is narrowed down to the key.

    Raises:
        TrainError: One line naming the first key that ``fit`` does not take (an unknown
            flag, or a value it refuses).
    """
    for p in params:
        if p.key in _RESERVED or p.key.startswith(("tune.", "config")):
            raise TrainError(f"space key {p.key}: set by tune for every trial, not searchable")
    probes = {p.key: list(p.probes()) for p in params}
    for i in range(max(len(v) for v in probes.values())):
        values = {k: v[i % len(v)] for k, v in probes.items()}
        msg = check_fit_args(cli, [*fit_args, *param_flags(params, values)])
        if msg is None:
            continue
        for p in params:
            alone = check_fit_args(cli, [*fit_args, *param_flags([p], values)])
            if alone is not None:
                if alone.startswith("Unrecognized arguments"):
                    alone = f"not an option of `train.py fit` ({alone})"
                raise TrainError(f"space key {p.key}: {alone}")
        raise TrainError(f"space keys {', '.join(probes)} (together): {msg}")


def prepare(raw_args: list[str], fit_main: FitMain, cli_class: type, script: Path) -> Setup:
    """Checks the command line, the space and the fit flags; creates nothing.

    Raises:
        TrainError: One line: a bad option, space key or fit flag.
    """
    raw, fit_args = split_options(raw_args, "tune")
    opts = parse_tune_options(raw)
    params = load_space(opts.space)  # type: ignore[arg-type]
    grid = {p.key: p.grid() for p in params} if opts.sampler == "grid" else {}
    cli = parse_fit(fit_main, cli_class, fit_args)
    config = cli.config["fit"]
    trainer_cfg = config.get("trainer") or {}
    if trainer_cfg.get("default_root_dir"):
        raise TrainError("--trainer.default_root_dir: each trial has its own run dir (--run.root)")
    check_space(cli, params, fit_args)
    run = run_options_dict(config.get("run"))
    root = Path(run.get("root") or os.environ.get("FUSEDCE_RUNS_DIR") or "runs").resolve()
    name = opts.study or Path(opts.space).stem  # type: ignore[arg-type]
    study_dir = root / name
    direction = opts.direction or ("minimize" if "loss" in opts.metric else "maximize")
    mode = settle_wandb_mode(run, trainer_cfg.get("logger"))
    end_hand_over()  # the decision goes to the trials through WANDB_MODE instead
    wandb = {
        "mode": mode,
        "auto": run.get("wandb_mode", "auto") == "auto",
        "project": run.get("wandb_project") or "fusedce",
        "entity": run.get("wandb_entity"),
    }
    max_epochs = trainer_cfg.get("max_epochs")
    return Setup(
        opts=opts,
        params=params,
        fit_args=fit_args,
        study_name=name,
        study_dir=study_dir,
        storage_url=opts.storage or str(study_dir / "optuna.journal"),
        direction=direction,
        wandb=wandb,
        max_epochs=int(max_epochs) if max_epochs else None,
        script=script,
        grid=grid,
    )
