"""The summary that ``train.py`` prints at the end of a run: where its results are."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer

from .callbacks import DecisionBoundaryPlot, PredictionWriter
from .wandb_setup import ConfigToWandb

# The metrics the summary shows (when the run logged them).
SHOWN_METRICS = ("val/acc", "val/acc_best", "val/loss", "test/acc", "test/loss")


def run_report(
    trainer: Trainer,
    subcommand: str,
    run_dir: Path,
    wandb_mode: str | None = None,
    interrupted: str | None = None,
    threads: str | None = None,
) -> str:
    """Human-readable summary of where a finished (or interrupted) run's results are.

    Args:
        trainer: The trainer after the subcommand ran.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        run_dir: The run directory.
        wandb_mode: The mode the W&B runs logged in (``offline``: the summary says how to
            upload them).
        interrupted: ``"SIGINT"`` / ``"SIGTERM"`` when a signal stopped the run.
        threads: torch's CPU thread count and why (`threads.set_threads`), when set.
    """
    lines = [f"Results of `{subcommand}`:", f"  run dir:     {run_dir}"]
    if interrupted:
        lines[0] = (
            f"Results of `{subcommand}` (interrupted by {interrupted} at step "
            f"{trainer.global_step}; resume with --ckpt_path <last ckpt>):"
        )
    lines.append(f"  config:      {run_dir / 'config.yaml'}")
    for cb in trainer.callbacks:
        for wandb_dir, run_id in cb.wandb_runs if isinstance(cb, ConfigToWandb) else ():
            lines.append(f"  W&B run dir: {wandb_dir}  ({wandb_mode}, id {run_id})")
            if wandb_mode == "offline":
                lines.append(f"               upload later with: wandb sync {wandb_dir}")
    ckpt = trainer.checkpoint_callback
    if subcommand == "fit" and ckpt is not None:
        lines.append(f"  checkpoint:  {getattr(ckpt, 'best_model_path', '') or '(none)'}")
        last = getattr(ckpt, "last_model_path", "")
        if last:
            lines.append(f"  last ckpt:   {last}")
    for cb in trainer.callbacks:
        if isinstance(cb, DecisionBoundaryPlot) and cb.path is not None:
            lines.append(f"  plot:        {cb.path}")
        if isinstance(cb, PredictionWriter) and cb.path is not None:
            lines.append(f"  predictions: {cb.path}")
    lines.append(f"  metrics:     {run_dir / 'metrics.json'}")
    if threads:
        lines.append(f"  threads:     {threads}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in SHOWN_METRICS}
    if metrics:
        lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return "\n".join(lines)
