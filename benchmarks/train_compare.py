"""The large-vocabulary preset trained with the fused head and without it, back to back.

Each run is ``python train.py --config configs/large_vocab.yaml`` for one epoch of ``--steps``
batches (W&B disabled: metrics go to the run's CSV file), in this process. Printed per run: the last
``train/device/samples_per_sec`` from ThroughputMonitor, the wall time of fit, the GPU peak memory
(``torch.cuda.max_memory_allocated``) and the last train/val loss.

    python -m benchmarks.train_compare [--steps 200] [--root runs/compare]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

import train

VARIANTS = {
    "fused head (linear_cross_entropy)": ["--model.fused_head", "true"],
    "unfused (Linear + fusedce.cross_entropy)": ["--model.fused_head", "false"],
    "torch (Linear + F.cross_entropy)": [
        *("--model.fused_head", "false"),
        *("--model.loss_impl", "torch"),
    ],
}


def last_logged(path: Path, column: str) -> float:
    """The last value of ``column`` in a CSVLogger file (ThroughputMonitor logs to the loggers
    only, not to callback_metrics); NaN when never logged."""
    value = float("nan")
    if path.exists():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get(column):
                    value = float(row[column])
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--root", default="runs/compare")
    a, extra = p.parse_known_args()  # anything else goes to train.py, e.g. --data.vocab_size 1000
    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{card}, {a.steps} steps of configs/large_vocab.yaml {' '.join(extra)}")
    header = "| variant | samples/s | fit wall s | peak MiB | train/loss | val/loss |\n"
    header += "|---|---:|---:|---:|---:|---:|"
    rows = []
    for i, (name, flags) in enumerate(VARIANTS.items()):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        args = [
            "fit",
            "--config",
            "configs/large_vocab.yaml",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            str(a.steps),
            "--trainer.limit_val_batches",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--data.num_workers",
            "2",
            "--run.wandb_mode",
            "disabled",
            "--run.plot",
            "false",
            "--run.root",
            a.root,
            "--run.name",
            f"variant{i}",
            *flags,
            *extra,
        ]
        t0 = time.perf_counter()
        cli = train.main(args)
        wall = time.perf_counter() - t0
        m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        r = (
            name,
            last_logged(cli.run_dir / "metrics.csv", "train/device/samples_per_sec"),
            wall,
            torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
            m.get("train/loss", float("nan")),
            m.get("val/loss", float("nan")),
        )
        rows.append(f"| {r[0]} | {r[1]:.0f} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.4f} | {r[5]:.4f} |")
        print(header, *rows, sep="\n", flush=True)  # so far, in case the rest is cut short


if __name__ == "__main__":
    main()
