"""The private parts of Lightning, jsonargparse and W&B that the training stack relies on.

Each test fails when a library release removes or changes one of them, so that an upgrade
breaks here, with the place named, and not in the middle of a run. The code that uses each one
says why it does.
"""

from __future__ import annotations

import inspect
from argparse import ArgumentError
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger

from fusedce.lightning_modules.cli_parser import subcommand_optional_in_help
from fusedce.lightning_modules.stack_callbacks import early_stopping_at_validation_ends
from fusedce.lightning_modules.wandb_setup import make_logger


def test_lightning_cli_calls_the_private_hooks_that_train_py_overrides() -> None:
    """train.py's CLI overrides `_parse_ckpt_path` (checked checkpoint settings) and wraps
    `_run_subcommand` (an interrupted fit reports): both must still be called by __init__,
    the checkpoint hook after parsing and before instantiation."""
    source = inspect.getsource(LightningCLI.__init__)
    parse = source.index("self.parse_arguments(")
    ckpt = source.index("self._parse_ckpt_path()")
    instantiate = source.index("self.instantiate_classes()")
    assert parse < ckpt < instantiate
    assert "self._run_subcommand(self.subcommand)" in source
    assert list(inspect.signature(LightningCLI._run_subcommand).parameters) == [
        "self",
        "subcommand",
    ]


def test_jsonargparse_subcommands_action_and_required_flag() -> None:
    """`subcommand_optional_in_help` reaches the subcommands action through the parser's
    `_subcommands_action` and clears its `_required` (what jsonargparse reads)."""
    parser = LightningArgumentParser(exit_on_error=False)
    sub = LightningArgumentParser()
    sub.add_argument("--x", type=int, default=0)
    action = parser.add_subcommands()
    action.add_subcommand("fit", sub)
    assert parser._subcommands_action is action
    assert action._required is True
    subcommand_optional_in_help(parser, "fit")
    assert action._required is False and action.help == "(default: fit)"
    assert "(required)" not in parser.format_help()


def test_wandb_logger_keeps_its_init_arguments(tmp_path: Path) -> None:
    """WandbLogger passes `anonymous` to wandb.init from its `_wandb_init` dict, which makes
    wandb warn on every run; `make_logger` removes it there."""
    plain = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert isinstance(plain._wandb_init, dict) and "anonymous" in plain._wandb_init
    logger = make_logger(None, {}, tmp_path / "run", "offline", None)
    assert isinstance(logger, WandbLogger)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["dir"] == str(
        tmp_path / "run"
    )


def test_wandb_netrc_reader() -> None:
    """`wandb_has_credentials` asks wandb's own .netrc reader (no public call that never
    prompts exists)."""
    from wandb.sdk.lib.wbauth import wbnetrc

    assert "host" in inspect.signature(wbnetrc.read_netrc_auth).parameters


@pytest.mark.parametrize(("given", "expected"), [(None, False), (True, True)])
def test_early_stopping_checked_at_validation_ends(given: bool | None, expected: bool) -> None:
    """Configured EarlyStopping callbacks that leave check_on_train_epoch_end unset get False
    (set in the config, so no private attribute of the instance is touched)."""
    from jsonargparse import Namespace

    cfg = [
        Namespace(
            class_path="lightning.pytorch.callbacks.EarlyStopping",
            init_args=Namespace(monitor="val/loss", check_on_train_epoch_end=given),
        ),
        Namespace(
            class_path="lightning.pytorch.callbacks.LearningRateMonitor",
            init_args=Namespace(logging_interval="step"),
        ),
    ]
    early_stopping_at_validation_ends(cfg)
    assert cfg[0].init_args.check_on_train_epoch_end is expected
    assert "check_on_train_epoch_end" not in cfg[1].init_args


def test_jsonargparse_literal_action_and_its_message() -> None:
    """`cli_parser.bad_choice_message` finds an option's action with jsonargparse's
    `_find_action` and reads its `_typehint`, and recognises the message jsonargparse gives for
    a value outside an all-string Literal."""
    from typing import Literal

    from jsonargparse._actions import _find_action

    from fusedce.lightning_modules.cli_parser import bad_choice_message

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--model.activation", type=Literal["relu", "gelu"], default="relu")
    action = _find_action(parser, "model.activation")
    assert action is not None and action._typehint == Literal["relu", "gelu"]
    with pytest.raises(ArgumentError) as err:
        parser.parse_args(["--model.activation", "swish"])
    message = bad_choice_message(parser, str(err.value), ["--model.activation", "swish"])
    assert message == "--model.activation: got 'swish'; expected one of: relu, gelu"
