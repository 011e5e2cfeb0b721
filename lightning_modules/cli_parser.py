"""The argument parser of ``train.py``: errors are one line and a pointer to ``--help``."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, Literal, get_args, get_origin

from jsonargparse._actions import _find_action
from lightning.pytorch.cli import LightningArgumentParser

# The arguments of the parse in progress: a bad choice is reported by the subcommand's parser,
# which never sees them (its parent parses and hands it the rest).
_PARSED_ARGS: ContextVar[Sequence[str]] = ContextVar("fusedce_parsed_args", default=())
# jsonargparse 4.41 fails on any value outside an all-string Literal with this TypeError text
# instead of naming the value (its Literal branch builds a Union of the non-string choices).
_NO_TYPES = re.compile(r'Parser key "(?P<key>[^"]+)":\s*Cannot take a Union of no types\.?')


def clean_error(msg: str) -> str:
    """Reduces jsonargparse's "does not validate against any Union subtype" to the real cause."""
    if "Does not validate against any of the Union subtypes" not in msg:
        return msg
    causes: list[str] = []
    cause_indent = None
    for line in msg.splitlines():
        indent = len(line) - len(line.lstrip())
        if line.strip().startswith("- "):
            causes.append(line.strip()[2:])
            cause_indent = indent
        elif cause_indent is not None and indent > cause_indent:
            # A nested parser's own error (e.g. a class's init argument) goes on the cause's line.
            causes[-1] += " " + line.strip()
        else:
            cause_indent = None
    causes = [c for c in causes if not c.startswith("Expected a <class 'NoneType'>")]
    return "; ".join(causes) or msg


def given_value(args: Sequence[str], key: str) -> str | None:
    """The last value given to ``--key`` in ``args`` (``--key v`` or ``--key=v``), if any."""
    flag, value = f"--{key}", None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def bad_choice_message(parser: Any, message: str, args: Sequence[str]) -> str | None:
    """One line for a value outside a `typing.Literal`'s choices, or None for another error.

    Args:
        parser: The parser that reported the error (it holds the key's action).
        message: jsonargparse's message.
        args: The parsed arguments (where the bad value is looked up; a value from a config
            file is not named, its choices still are).
    """
    match = _NO_TYPES.search(message)
    if match is None:
        return None
    key = match["key"]
    # jsonargparse keeps an option's type only on its private action (pinned by
    # tests/test_library_internals.py).
    action = _find_action(parser, key)
    typehint = getattr(action, "_typehint", None)
    if get_origin(typehint) is not Literal:
        return None
    choices = ", ".join(str(c) for c in get_args(typehint))
    value = given_value(args, key)
    got = f" got {value!r};" if value is not None else ""
    return f"--{key}:{got} expected one of: {choices}"


class FusedCEParser(LightningArgumentParser):
    """Parser whose errors are one line and a hint to ``--help`` (not a screen of usage)."""

    def parse_args(self, args: Sequence[str] | None = None, *a: Any, **kw: Any) -> Any:
        """As jsonargparse's; remembers ``args`` for the error messages."""
        token = _PARSED_ARGS.set(tuple(sys.argv[1:] if args is None else args))
        try:
            return super().parse_args(args, *a, **kw)
        finally:
            _PARSED_ARGS.reset(token)

    def error(self, message: str, ex: Exception | None = None) -> Any:
        """Prints ``<prog>: error: <message>`` and where the usage is, then exits with code 2."""
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        choice = bad_choice_message(self, message, _PARSED_ARGS.get())
        if choice is not None:  # names the value and every choice: no pointer to --help needed
            sys.stderr.write(f"{prog}: error: {choice}\n")
            raise SystemExit(2)
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
