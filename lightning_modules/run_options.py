"""The ``--run.*`` options of ``train.py`` (where results go, how the run is tracked) and the
CPU sizes that GPU-sized presets switch to when there is no GPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import TrainError


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
        threads: torch's intra-op CPU threads in this process (default: 1 for a model under
            a million parameters, whose products are too small to share out, else torch's
            default of one per core); the run summary says which.
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
    threads: int | None = None
    cpu_overrides: dict[str, Any] = field(default_factory=dict)


def run_options_dict(opts: Any) -> dict[str, Any]:
    """The ``run`` section as a plain dict, whether parsed (a namespace) or instantiated."""
    if isinstance(opts, RunOptions):
        return dataclasses.asdict(opts)
    return dict(opts or {})


def uses_gpu(accelerator: Any) -> bool:
    """Whether ``trainer.accelerator`` puts the run on a GPU-class device."""
    accelerator = str(accelerator)
    if accelerator == "cpu":
        return False
    if accelerator in ("auto", "gpu", "cuda", "None"):
        return torch.cuda.is_available()
    return True  # mps, tpu, a custom accelerator: treat it as the preset's target


def apply_cpu_overrides(config: Any, cli_args: Iterable[str]) -> list[str]:
    """Applies ``run.cpu_overrides`` to a subcommand's parsed ``config`` when it has no GPU.

    Args:
        config: The subcommand's section of the parsed configuration (changed in place).
        cli_args: The command-line arguments: a key given there as a flag keeps its value.

    Returns:
        The applied settings as ``key=value`` strings (empty: none applied).

    Raises:
        TrainError: An override names a key that is not in the configuration.
    """
    overrides = dict(config.get("run", {}).get("cpu_overrides") or {})
    if not overrides or uses_gpu(config.get("trainer", {}).get("accelerator")):
        return []
    given = {a.split("=")[0].replace(".init_args.", ".") for a in cli_args}
    applied = []
    for key, value in overrides.items():
        if f"--{key.replace('.init_args.', '.')}" in given:
            continue  # an explicit flag wins
        try:
            config[key] = value
        except Exception as err:  # a key that is not in the config
            raise TrainError(f"run.cpu_overrides: cannot set {key}: {err}") from err
        applied.append(f"{key.replace('.init_args.', '.')}={value}")
    return applied
