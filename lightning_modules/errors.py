"""The error that ends a training run with one line on stderr instead of a traceback."""

from __future__ import annotations


class TrainError(Exception):
    """A setting, or the state of a file it names, that the run cannot go on with.

    ``train.py`` prints ``train.py <subcommand>: error: <message>`` and exits with
    `exit_code` (2: a bad setting or file).
    """

    exit_code = 2
