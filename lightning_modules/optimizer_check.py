"""A dry run of the model's optimizer and scheduler, so that a value they reject is a one-line
error before the run starts (and before anything is written)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from .classifier import Classifier
from .errors import TrainError


def check_optimization(model: Classifier, model_cfg: Any) -> None:
    """Builds the optimizer and scheduler once on ``model``'s parameters (and steps the
    scheduler), on a throwaway optimizer.

    Args:
        model: The instantiated model (its ``optimizer_factory`` / ``lr_scheduler_factory``).
        model_cfg: The parsed ``model`` section (the flags to name in the error).

    Raises:
        TrainError: The optimizer or scheduler rejects its arguments (the message names them).
    """
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
        raise TrainError(optim_error(section, configured, err)) from err


def optim_error(section: str, configured: Any, err: Exception) -> str:
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
