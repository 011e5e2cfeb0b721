"""Callbacks of the training stack: decision-boundary picture, metrics file, predictions; and
the batch-size function that Lightning's ``ThroughputMonitor`` is configured with."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import RunDiverged


def batch_size(batch: Any) -> int:
    """Rows ``B`` of a batch ``(x, y)`` or ``x``, with ``x`` of shape ``(B, D)``.

    The ``batch_size_fn`` of Lightning's ``ThroughputMonitor`` in the configs (it turns batches
    into the ``train/device/samples_per_sec`` metric, and ``train/samples_per_sec`` over all
    devices when there are several).
    """
    x = batch[0] if isinstance(batch, list | tuple) else batch
    return int(x.shape[0])


def _run_dir(trainer: Trainer, dirpath: str | None) -> Path:
    return Path(dirpath if dirpath is not None else trainer.default_root_dir)


class DecisionBoundaryPlot(Callback):
    """At the end of ``fit``, draws the learned decision regions against the true curve(s).

    Only acts when the data module describes a 2-D curve task (it has ``band_boundaries()``,
    e.g. `datamodules.CurveDataModule`). The PNG is written to ``dirpath`` (default: the trainer's
    ``default_root_dir``, i.e. the run directory) and logged to every W&B logger as a
    ``wandb.Image`` under the key ``decision_boundary``. Rank 0 only.

    Args:
        filename: Name of the PNG file.
        dirpath: Directory of the PNG (default: ``trainer.default_root_dir``).
        grid_size: Resolution of the evaluation grid per axis.
        num_points: Number of validation points drawn on top (0 = none).
    """

    def __init__(
        self,
        filename: str = "decision_boundary.png",
        dirpath: str | None = None,
        grid_size: int = 300,
        num_points: int = 1500,
    ) -> None:
        self.filename = filename
        self.dirpath = dirpath
        self.grid_size = grid_size
        self.num_points = num_points
        self.path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not hasattr(dm, "band_boundaries"):
            return
        self.path = _run_dir(trainer, self.dirpath) / self.filename
        fig = self.figure(pl_module, dm)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=120, bbox_inches="tight")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"decision_boundary": wandb.Image(str(self.path))})
        import matplotlib.pyplot as plt

        plt.close(fig)

    @torch.no_grad()
    def figure(self, pl_module: LightningModule, dm: Any) -> Any:
        """Builds the matplotlib figure (Agg backend) of ``pl_module`` on data module ``dm``."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        was_training = pl_module.training
        pl_module.eval()
        n = self.grid_size
        axis = torch.linspace(0.0, 1.0, n)
        gx, gy = torch.meshgrid(axis, axis, indexing="xy")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).to(pl_module.device)
        pred = pl_module(grid).argmax(dim=-1).reshape(n, n).cpu()
        pl_module.train(was_training)

        k = dm.num_classes
        fig, ax = plt.subplots(figsize=(5.5, 5))
        cmap = plt.get_cmap("coolwarm" if k == 2 else "viridis", k)
        ax.imshow(
            pred.numpy(),
            origin="lower",
            extent=(0, 1, 0, 1),
            cmap=cmap,
            vmin=-0.5,
            vmax=k - 0.5,
            alpha=0.35,
            interpolation="nearest",
        )
        ax.contour(
            gx.numpy(),
            gy.numpy(),
            pred.numpy(),
            levels=[i + 0.5 for i in range(k - 1)],
            colors="k",
            linewidths=1.2,
        )
        x1 = torch.linspace(0, 1, 400)
        for i, c in enumerate(dm.band_boundaries()):
            ax.plot(
                x1.numpy(),
                (c * x1**2).clamp(max=1.0).numpy(),
                "--",
                color="tab:green",
                lw=2,
                label="true boundary" if i == 0 else None,
            )
        ax.plot([], [], "k-", lw=1.2, label="learned boundary")
        if self.num_points and dm.val_set is not None:
            xv, yv = dm.val_set.tensors
            xv, yv = xv[: self.num_points], yv[: self.num_points]
            ax.scatter(xv[:, 0], xv[:, 1], c=yv, cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=4)
        try:
            acc = pl_module.trainer.callback_metrics.get("val/acc")
        except RuntimeError:  # not attached to a trainer
            acc = None
        title = "learned vs true boundary x2 = x1^2" if k == 2 else f"{k} bands"
        if acc is not None:
            title += f" (val acc {float(acc):.4f})"
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="x1", ylabel="x2", title=title)
        ax.legend(loc="upper left", fontsize=8)
        return fig


class RunSummary(Callback):
    """Writes the final metrics of each stage to ``metrics.json`` in the run directory.

    On teardown of every stage (fit / validate / test / predict) it dumps the trainer's
    ``callback_metrics`` as floats, plus ``stage``, ``global_step``, ``epoch`` (the last epoch
    that ran, counted from 0 as the progress bar, the W&B ``epoch`` and the checkpoint names
    count them), ``epochs_completed`` (``trainer.current_epoch``), the best
    checkpoint and ``status``: ``"finished"``, or ``"interrupted"`` (SIGINT / SIGTERM),
    ``"diverged"`` (`RunDiverged`: a non-finite loss, gradient norm or weight; ``error`` says
    which) or ``"failed"`` (any other exception; ``error`` names it) when the stage ended early.
    Rank 0 writes ``metrics.json`` and puts ``status`` into the W&B run's summary; in a
    distributed run every rank also writes ``metrics.rank{R}.json`` so that runs can be checked
    for cross-rank agreement.

    Args:
        dirpath: Output directory (default: ``trainer.default_root_dir``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.summary: dict[str, Any] = {}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.write(trainer, stage, "finished")

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Writes the metrics of a stage that an exception or a signal ended."""
        stage = trainer.state.stage.value if trainer.state.stage else "unknown"
        if isinstance(exception, KeyboardInterrupt | SIGTERMException):
            self.write(trainer, stage, "interrupted")
        elif isinstance(exception, RunDiverged):
            self.write(trainer, stage, "diverged", str(exception))
        else:
            self.write(trainer, stage, "failed", f"{type(exception).__name__}: {exception}")

    def write(self, trainer: Trainer, stage: str, status: str, error: str | None = None) -> None:
        """Writes ``metrics.json`` (and the per-rank file) for ``stage`` with ``status``."""
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            v = float(value)
            metrics[key] = v if math.isfinite(v) else str(v)
        ckpt = trainer.checkpoint_callback
        summary = {
            "stage": stage,
            "global_step": trainer.global_step,
            "epoch": last_epoch(trainer, stage),
            "epochs_completed": trainer.current_epoch,
            "metrics": metrics,
            "best_model_path": getattr(ckpt, "best_model_path", None) or None,
            "status": status,
        }
        if error:
            summary["error"] = error
        self.summary = summary
        out = _run_dir(trainer, self.dirpath)
        names = []
        if trainer.is_global_zero:
            names.append("metrics.json")
        if trainer.world_size > 1:
            names.append(f"metrics.rank{trainer.global_rank}.json")
        if trainer.is_global_zero:
            _wandb_summary_status(status)
        for name in names:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
            tmp.replace(out / name)


def last_epoch(trainer: Trainer, stage: str) -> int:
    """The last epoch a fit ran, from 0: the one in progress when it stopped mid-epoch, else
    the last one completed (``trainer.current_epoch`` counts completed epochs). Other stages
    run no epochs of their own: ``trainer.current_epoch`` (that of the loaded checkpoint)."""
    if stage != "fit":
        return trainer.current_epoch
    started = trainer.fit_loop.epoch_progress.current.started
    return max(started - 1, 0)


def _wandb_summary_status(status: str) -> None:
    """Sets ``status`` in the summary of this process's open W&B run (if there is one)."""
    wandb = sys.modules.get("wandb")  # not imported: no W&B run
    if wandb is not None and wandb.run is not None:
        wandb.run.summary["status"] = status


class PredictionWriter(BasePredictionWriter):
    """Saves the outputs of ``predict`` as one ``torch.save`` file in the run directory.

    The file holds the concatenated `Classifier.predict_step` outputs, in data-loader order:
    ``{"inputs": (N, D), "targets": (N,) int64 (when the data has labels), "preds": (N,) int64,
    "confidence": (N,) float32}``. In a distributed run each rank
    writes ``predictions.rank{R}.pt`` with its own shard and its ``batch_indices``.

    Args:
        dirpath: Output directory (default: ``trainer.default_root_dir``).
        filename: File name for single-process runs.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions.pt") -> None:
        super().__init__(write_interval="epoch")
        self.dirpath = dirpath
        self.filename = filename
        self.path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        """Concatenates the per-batch prediction dicts and saves them."""
        batches = (
            predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        )
        out: dict[str, Any] = {}
        if batches:
            out = {k: torch.cat([b[k].cpu() for b in batches]) for k in batches[0]}
        name = self.filename
        if trainer.world_size > 1:
            name = f"predictions.rank{trainer.global_rank}.pt"
            out["batch_indices"] = batch_indices
        self.path = _run_dir(trainer, self.dirpath) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, self.path)
