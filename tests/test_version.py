"""``fusedce.__version__``: the installed package's version, which is pyproject.toml's; the
checkout's pyproject.toml where the package is not installed."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import fusedce
from fusedce import _version

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> str:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_version_is_pyprojects():
    assert isinstance(fusedce.__version__, str)
    assert fusedce.__version__ == _declared()
    assert fusedce.__version__ == importlib.metadata.version("fusedce")


def test_not_installed_reads_pyproject(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert _version.version() == _declared()


def test_pyproject_version_reads_the_project_table(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[tool.other]\nversion = "9.9"\n\n[project]\nname = "x"\nversion = \'1.2.3\'\n\n'
        '[tool.more]\nversion = "7"\n'
    )
    assert _version.pyproject_version(path) == "1.2.3"
    path.write_text('[project]\nname = "x"\n\n[tool.x]\nversion = "7"\n')
    assert _version.pyproject_version(path) is None
    assert _version.pyproject_version(tmp_path / "missing.toml") is None
