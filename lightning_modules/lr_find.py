"""``train.py lr_find``: Lightning's learning-rate range test on the configured model and data.

``python train.py lr_find [--config C] [flags] [--lr_find.num_training 100] [...]`` trains for
``num_training`` steps while the learning rate grows from ``min_lr`` to ``max_lr``
(`lightning.pytorch.tuner.Tuner.lr_find`), then puts the weights back. Into a new run
directory (``<root>/<stamp>-lr_find-<id>``) it writes::

    lr_find.png     loss against learning rate (log x-axis), the suggestion marked
    lr_find.json    {"suggestion": float | null, "lr": [...], "loss": [...]}
    config.yaml     the configuration it ran with; the W&B run (the plot, the suggestion)

and prints the suggestion (where the smoothed loss falls fastest against ``log(lr)``,
`steepest_descent`) with the ``fit`` command that uses it (``--model.optimizer.lr``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import TrainError
from .run_dir import choose_run_dir
from .run_options import run_options_dict
from .tools import FitMain, command_line, flag_names, plain, split_options, without_flag
from .wandb_setup import ConfigToWandb

LR_FLAG = "--model.optimizer.lr"


@dataclass
class LRFindOptions:
    """The learning-rate range test (`lightning.pytorch.tuner.Tuner.lr_find`).

    Args:
        min_lr: Learning rate of the first step.
        max_lr: Learning rate of the last step.
        num_training: Number of training steps (learning rates tried).
        mode: How the rate grows from step to step: ``exponential`` or ``linear``.
        early_stop_threshold: Stop once the loss exceeds this multiple of the best loss so far
            (null: never).
    """

    min_lr: float = 1e-8
    max_lr: float = 1.0
    num_training: int = 100
    mode: Literal["exponential", "linear"] = "exponential"
    early_stop_threshold: float | None = 4.0


def lr_find_cli(base: type) -> type:
    """A subclass of ``train.py``'s CLI ``base`` whose ``fit`` runs the range test."""

    class LRFindCLI(base):  # type: ignore[misc, valid-type]
        """``base`` with ``--lr_find.*``; its ``fit`` runs `Tuner.lr_find` instead of training.

        Attributes:
            results: ``{"suggestion", "lr", "loss"}`` once the test ran.
            files: The PNG and JSON written into the run directory.
        """

        results: dict[str, Any] | None = None
        files: tuple[Path, ...] = ()

        def add_arguments_to_parser(self, parser: Any) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_class_arguments(LRFindOptions, "lr_find")

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            """As ``base``; the default run name says ``lr_find`` instead of ``fit``."""
            config = self.config_init[self.subcommand]
            run = config.get("run")
            if run is not None and not run.name:
                trainer_cfg = dict(config.get("trainer", {}))
                run_dir = choose_run_dir(run_options_dict(run), trainer_cfg, "lr_find")
                run.root, run.name = str(run_dir.parent), run_dir.name
            return super().instantiate_trainer(**kwargs)

        def fit(self, model: Any, datamodule: Any = None, ckpt_path: Any = None, **_: Any) -> None:
            """Runs the range test (LightningCLI calls the CLI's method named after the
            subcommand in place of the trainer's)."""
            from lightning.pytorch.tuner import Tuner

            if ckpt_path:
                raise TrainError("lr_find starts from the configured model: no --ckpt_path")
            opts: LRFindOptions = self.config_init[self.subcommand]["lr_find"]
            finder = Tuner(self.trainer).lr_find(
                model,
                datamodule=datamodule,
                min_lr=opts.min_lr,
                max_lr=opts.max_lr,
                num_training=opts.num_training,
                mode=opts.mode,
                early_stop_threshold=opts.early_stop_threshold,
                update_attr=False,
            )
            if finder is None or not self.trainer.is_global_zero:
                return
            lrs = [_finite(v) for v in finder.results["lr"]]
            losses = [_finite(v) for v in finder.results["loss"]]
            suggestion = steepest_descent(lrs, losses)
            self.results = {"suggestion": suggestion, "lr": lrs, "loss": losses}
            assert self.run_dir is not None
            self.files = write_results(self.results, self.run_dir)
            log_to_wandb(self.trainer, self.files[0], suggestion)

        def report(self) -> str:
            """Where the results are, the suggestion and the ``fit`` command that uses it."""
            lines = ["Results of `lr_find`:", f"  run dir:     {self.run_dir}"]
            assert self.run_dir is not None
            lines.append(f"  config:      {self.run_dir / 'config.yaml'}")
            for cb in self.trainer.callbacks:
                for wandb_dir, run_id in cb.wandb_runs if isinstance(cb, ConfigToWandb) else ():
                    lines.append(f"  W&B run dir: {wandb_dir}  ({self.wandb_mode}, id {run_id})")
            for path in self.files:
                lines.append(f"  {path.suffix[1:] + ':':<12} {path}")
            suggestion = (self.results or {}).get("suggestion")
            if suggestion is None:
                lines.append(
                    "  suggestion:  none (too few points or no descent: try a larger "
                    "--lr_find.num_training or another --lr_find.min_lr / max_lr)"
                )
                return "\n".join(lines)
            _, fit_args = split_options(self.user_args, "lr_find")
            fit_args = without_flag(fit_args, flag_names(LR_FLAG[2:]))
            lines.append(f"  suggestion:  {LR_FLAG} {suggestion:.3g}")
            lines.append(
                f"  train with:  {command_line(['fit', *fit_args, LR_FLAG, f'{suggestion:.3g}'])}"
            )
            return "\n".join(lines)

    return LRFindCLI


def steepest_descent(
    lrs: list[float | None], losses: list[float | None], skip_begin: int = 10, skip_end: int = 1
) -> float | None:
    """The learning rate where the smoothed loss falls fastest against ``log(lr)``.

    The first ``skip_begin`` and last ``skip_end`` points are left out (the start of the
    smoothing and the blow-up at the end), and so are non-finite losses. The slope is taken
    against ``log(lr)``, as the curve is plotted: against ``lr`` itself (Lightning's
    ``_LRFinder.suggestion``), the tiny steps between the smallest rates turn the noise there
    into the steepest slopes.

    Returns:
        The learning rate, or None with fewer than 3 usable points or no descent.
    """
    points = [
        (math.log(lr), loss, lr)
        for lr, loss in list(zip(lrs, losses, strict=True))[skip_begin : len(lrs) - skip_end]
        if lr is not None and lr > 0 and loss is not None
    ]
    if len(points) < 3:
        return None
    slopes = []
    for i in range(len(points)):
        lo, hi = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
        slopes.append((hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else 0.0)
    best = min(range(len(points)), key=lambda i: slopes[i])
    return points[best][2] if slopes[best] < 0 else None


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_results(results: dict[str, Any], run_dir: Path) -> tuple[Path, Path]:
    """Writes ``lr_find.png`` and ``lr_find.json`` into ``run_dir``; returns both paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / "lr_find.json"
    tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(json_path)

    points = [(lr, loss) for lr, loss in zip(results["lr"], results["loss"], strict=False)]
    points = [(lr, loss) for lr, loss in points if lr is not None and loss is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5, label="loss (smoothed)")
    suggestion = results["suggestion"]
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", ls="--", lw=1)
        nearest = min(points, key=lambda p: abs(math.log(p[0] / suggestion)), default=None)
        if nearest is not None:
            ax.plot(*nearest, "o", color="tab:red", ms=8, label=f"suggestion {suggestion:.3g}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    png_path = run_dir / "lr_find.png"
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png_path, json_path


def log_to_wandb(trainer: Any, png: Path, suggestion: float | None) -> None:
    """Logs the plot (key ``lr_find``) and the suggestion to the trainer's W&B runs."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            run.log({"lr_find": wandb.Image(str(png))})
            if suggestion is not None:
                run.summary["lr_find/suggestion"] = suggestion


def run_lr_find(args: list[str], fit_main: FitMain, cli_class: type) -> Any:
    """``train.py lr_find <args>``: the range test through ``fit_main``; returns the CLI."""
    cli_type = lr_find_cli(cli_class)
    cli_type.user_args = list(args)
    if any(a in ("-h", "--help") for a in args):
        print(plain(__doc__) + "\n\nThe --lr_find.* options and all of fit's:\n", flush=True)
    cli = fit_main(["fit", *args], cli_class=cli_type)
    if cli.interrupted:
        raise SystemExit(130 if cli.interrupted == "SIGINT" else 143)
    return cli
