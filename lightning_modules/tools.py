"""``train.py lr_find`` and ``train.py tune``: subcommands built on ``fit``.

``train.py``'s `main` hands them over here together with itself and its CLI class: ``lr_find``
(`lr_find.run_lr_find`) runs the range test on a subclass of that CLI; ``tune``
(`tune.run_tune`) checks its flags against ``fit``'s parser and runs every trial as
``train.py fit``. This module holds what both share.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TrainError

FitMain = Callable[..., Any]


def run_tool(args: list[str], *, fit_main: FitMain, cli_class: type, script: Path) -> Any:
    """Runs ``args`` = ``[tool, *flags]`` (``lr_find`` or ``tune``).

    Args:
        args: The tool's name and its command-line arguments.
        fit_main: ``train.main`` (``fit_main(["fit", ...], cli_class=...)`` runs the CLI).
        cli_class: ``train.py``'s CLI class, which the tools subclass.
        script: The path of ``train.py`` (``tune`` runs its trials with it).

    Raises:
        SystemExit: 2 for a bad setting (one line on stderr); 130 / 143 when a signal stopped
            the tool.
    """
    tool, rest = args[0], list(args[1:])
    try:
        if tool == "lr_find":
            from .lr_find import run_lr_find

            return run_lr_find(rest, fit_main, cli_class)
        from .tune import run_tune

        return run_tune(rest, fit_main=fit_main, cli_class=cli_class, script=script)
    except TrainError as err:
        sys.stderr.write(f"train.py {tool}: error: {err}\n")
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:  # before any run started (a run's own Ctrl-C is handled there)
        sys.stderr.write(f"train.py {tool}: interrupted\n")
        raise SystemExit(130) from None


def split_options(args: list[str], section: str) -> tuple[dict[str, str], list[str]]:
    """Separates ``--<section>.<name> value`` / ``--<section>.<name>=value`` from ``args``.

    Returns:
        ``({name: value}, the other arguments in their order)``.

    Raises:
        TrainError: An option of the section without a value.
    """
    prefix = f"--{section}."
    options: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(prefix):
            name, eq, value = arg[len(prefix) :].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise TrainError(f"{arg}: expected a value")
                value = args[i + 1]
                i += 1
            options[name] = value
        else:
            rest.append(arg)
        i += 1
    return options, rest


def without_flag(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``args`` without the flags ``names`` (``--name value`` and ``--name=value``)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{n}=" for n in names)):
            out.append(arg)
    return out


def flag_names(key: str) -> tuple[str, ...]:
    """The spellings of the flag of dotted ``key``: with and without ``init_args``."""
    short = key.replace(".init_args.", ".")
    parent, _, last = short.rpartition(".")
    long = f"{parent}.init_args.{last}" if parent else short
    return tuple(dict.fromkeys([f"--{key}", f"--{short}", f"--{long}"]))


def plain(doc: str | None) -> str:
    """A docstring as plain text for ``--help`` (without reST's backquotes)."""
    text = inspect.cleandoc(doc or "").replace("``", "").replace("`", "")
    return text.replace("::\n", ":\n")


def command_line(args: list[str]) -> str:
    """``python train.py <args>`` as one shell-quoted line."""
    return shlex.join(["python", "train.py", *args])


class _Parsed(Exception):
    """Carries a parsed CLI out of its constructor before anything is instantiated."""

    def __init__(self, cli: Any) -> None:
        super().__init__("parsed")
        self.cli = cli


def parse_fit(fit_main: FitMain, cli_class: type, fit_args: list[str]) -> Any:
    """Parses ``train.py fit <fit_args>`` with ``train.py``'s CLI, instantiating nothing.

    Returns:
        The CLI object after parsing: ``cli.config["fit"]`` (the parsed configuration) and
        ``cli.parser`` (to check more arguments with `check_fit_args`).

    Raises:
        TrainError: The arguments are not a valid ``fit`` configuration (the parser's message,
            one line).
    """

    class ParseOnly(cli_class):
        parsed_args: tuple[str, ...] = ()

        def parse_arguments(self, parser: Any, args: Any) -> None:
            self.parsed_args = tuple(args or ())
            super().parse_arguments(parser, args)

        def before_instantiate_classes(self) -> None:
            raise _Parsed(self)

    err = io.StringIO()
    logging.disable(logging.INFO)  # "Seed set to ..." of parsing: no run starts here
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            fit_main(["fit", *fit_args], cli_class=ParseOnly)
    except _Parsed as parsed:
        cli = parsed.cli
        # what train.py put before the user's arguments: the subcommand and its default config
        cli.fit_prefix = list(cli.parsed_args[: len(cli.parsed_args) - len(fit_args)])
        return cli
    except SystemExit as exit_:
        raise TrainError(f"the fit flags are not valid: {_parser_message(err.getvalue())}") from (
            exit_
        )
    finally:
        logging.disable(logging.NOTSET)
    raise TrainError("the fit flags were not parsed")  # pragma: no cover - fit_main returned


def check_fit_args(cli: Any, fit_args: list[str]) -> str | None:
    """Whether ``train.py fit <fit_args>`` parses: None, or the parser's message (one line).

    Args:
        cli: A CLI from `parse_fit` (its parser is reused).
        fit_args: The arguments after ``fit`` (train.py's default config goes first, as in
            every run).
    """
    from jsonargparse import ArgumentParser

    args = [*cli.fit_prefix, *fit_args]
    err = io.StringIO()
    parser: ArgumentParser = cli.parser
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit:
        return _parser_message(err.getvalue())
    return None


def _parser_message(stderr: str) -> str:
    """The ``error:`` line of the parser's output, without its program name."""
    for line in stderr.splitlines():
        if ": error: " in line:
            return line.split(": error: ", 1)[1].strip()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "invalid arguments"
