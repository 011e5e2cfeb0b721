"""The argument parser of ``train.py``: errors are one line and a pointer to ``--help``."""

from __future__ import annotations

import re
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser


def clean_error(msg: str) -> str:
    """Reduces jsonargparse's "does not validate against any Union subtype" to the real cause."""
    if "Does not validate against any of the Union subtypes" not in msg:
        return msg
    causes = [
        line.strip()[2:]
        for line in msg.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    return "; ".join(causes) or msg


class FusedCEParser(LightningArgumentParser):
    """Parser whose errors are one line and a hint to ``--help`` (not a screen of usage)."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        """Prints ``<prog>: error: <message>`` and where the usage is, then exits with code 2."""
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        msg = " ".join(clean_error(message).split())
        if re.search(r"--(optimizer|lr_scheduler)\b", msg):
            msg += " (set them on the model: --model.optimizer, --model.lr_scheduler)"
        sys.stderr.write(f"{prog}: error: {msg}\n")
        sys.stderr.write(f"{prog}: the options are listed by `{prog} --help`\n")
        raise SystemExit(2)


def subcommand_optional_in_help(parser: LightningArgumentParser, default: str) -> None:
    """Marks the subcommand of ``parser`` as optional, with ``default``, in its ``--help``.

    ``train.py`` always passes a subcommand (``fit`` where none is given), so jsonargparse's
    "(required)" would mislead. jsonargparse keeps the subcommands action only in the private
    ``_subcommands_action`` and reads "required" from the private ``_required`` (it clears the
    public ``required``); both are pinned by tests/test_library_internals.py.
    """
    action = parser._subcommands_action
    if action is None:
        return
    action.help = f"(default: {default})"
    action.required = False
    action._required = False
