"""``fusedce.__version__``: the installed distribution's version, or in a checkout that is not
installed, the one its pyproject.toml declares."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

UNKNOWN = "0+unknown"


def pyproject_version(path: Path) -> str | None:
    """The ``version`` key of the ``[project]`` table of a pyproject.toml (None where the file
    or the key is missing; a regular expression, as tomllib is Python 3.11+)."""
    try:
        text = path.read_text("utf-8")
    except OSError:
        return None
    project = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if project is None:
        return None
    found = re.search(r"""^version\s*=\s*["']([^"']+)["']""", project[1], re.M)
    return found[1] if found else None


def version() -> str:
    """The installed version; the checkout's pyproject.toml when not installed; else
    ``"0+unknown"``."""
    try:
        return importlib.metadata.version("fusedce")
    except importlib.metadata.PackageNotFoundError:
        pass
    return pyproject_version(Path(__file__).resolve().parents[1] / "pyproject.toml") or UNKNOWN
