"""Backend selection: the process default (``set_backend``, ``FUSEDCE_BACKEND``) and the
per-context override (``use_backend``), which follows threads and asyncio tasks; one rule for
names (case-insensitive, whitespace stripped) and a clear error for a bad environment value."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fusedce
from fusedce import backends, core


@pytest.fixture(autouse=True)
def _restore_default():
    """Every test leaves the process default as it found it (FUSEDCE_BACKEND may set it)."""
    default = fusedce.get_backend()
    yield
    fusedce.set_backend(default)


def _other(name: str) -> str:
    """A choice other than ``name``."""
    return "torch" if name != "torch" else "auto"


def test_overlapping_use_backend_blocks_in_two_threads():
    default = fusedce.get_backend()
    choices = {"a": "torch", "b": "triton"}
    # The barrier forces the blocks to overlap: a enters, b enters, a exits while b's block is
    # open, then b exits.
    barrier = threading.Barrier(2, timeout=60)
    seen: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            with fusedce.use_backend(choices[key]):
                barrier.wait()  # both blocks are open
                seen[key].append(fusedce.get_backend())
                if key == "b":
                    barrier.wait()  # a has left its block
                    seen[key].append(fusedce.get_backend())
            seen[key].append(fusedce.get_backend())
            if key == "a":
                barrier.wait()  # b's block was open all along
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(key,)) for key in choices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert seen == {"a": ["torch", default], "b": ["triton", "triton", default]}
    assert fusedce.get_backend() == default


def test_use_backend_restores_after_an_exception_and_nests():
    default = fusedce.get_backend()
    with pytest.raises(KeyError), fusedce.use_backend("torch"):
        assert fusedce.get_backend() == "torch"
        with fusedce.use_backend("triton"):
            assert fusedce.get_backend() == "triton"
        assert fusedce.get_backend() == "torch"
        raise KeyError
    assert fusedce.get_backend() == default


def test_set_backend_is_the_default_of_a_new_thread():
    new = _other(fusedce.get_backend())
    fusedce.set_backend(new)
    seen: list[str] = []
    t = threading.Thread(target=lambda: seen.append(fusedce.get_backend()))
    t.start()
    t.join(timeout=60)
    assert seen == [new]


def test_set_backend_in_a_thread_is_the_process_default():
    new = _other(fusedce.get_backend())
    t = threading.Thread(target=fusedce.set_backend, args=(new,))
    t.start()
    t.join(timeout=60)
    assert fusedce.get_backend() == new
    # An open block keeps its own choice; the new default applies once it exits.
    with fusedce.use_backend("triton"):
        fusedce.set_backend("torch")
        assert fusedce.get_backend() == "triton"
    assert fusedce.get_backend() == "torch"


def test_use_backend_follows_asyncio_tasks():
    default = fusedce.get_backend()

    async def task(name: str, entered: asyncio.Event, other: asyncio.Event) -> tuple[str, str]:
        with fusedce.use_backend(name):
            entered.set()
            await other.wait()  # the other task's block is open too
            inside = fusedce.get_backend()
        return inside, fusedce.get_backend()

    async def main():
        ea, eb = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task("torch", ea, eb), task("triton", eb, ea))

    assert asyncio.run(main()) == [("torch", default), ("triton", default)]
    assert fusedce.get_backend() == default


@pytest.mark.parametrize("name", ["TORCH", " torch ", "Torch\n"])
def test_names_are_case_insensitive_and_stripped(name):
    fusedce.set_backend(name)
    assert fusedce.get_backend() == "torch"
    fusedce.set_backend("auto")
    with fusedce.use_backend(name):
        assert fusedce.get_backend() == "torch"


@pytest.mark.parametrize("name", ["bogus", "", "torch-ish", None, 1])
def test_unknown_names_raise(name):
    default = fusedce.get_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        fusedce.set_backend(name)
    with pytest.raises(ValueError, match="unknown backend"), fusedce.use_backend(name):
        pass
    assert fusedce.get_backend() == default


def test_use_backend_chooses_the_backend():
    x = torch.randn(4, 7)
    with fusedce.use_backend("torch"):
        assert not fusedce.uses_triton(x)


def _import_with(value: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FUSEDCE_BACKEND": value}
    code = "import fusedce; print(fusedce.get_backend())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("value", "expected"), [(" Torch ", "torch"), ("AUTO", "auto"), ("", "auto")]
)
def test_environment_variable_sets_the_default(value, expected):
    done = _import_with(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_bad_environment_variable_fails_the_import_naming_it():
    done = _import_with("bogus")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError"), done.stderr
    for part in ("FUSEDCE_BACKEND", "'bogus'", "'auto'", "'torch'", "'triton'"):
        assert part in last, last


def test_every_backend_covers_what_core_asks():
    """Each registered backend is a ``Backend`` with every member core calls; the old names of
    ``fusedce.backends`` keep working."""
    for name in ("torch", "triton"):
        backend = backends.registered(name)
        assert isinstance(backend, backends.Backend) and backend.name == name
        for member in ("takes", "run_rows", "rows_per_call", "mean_scale", "reduce_rows"):
            assert callable(getattr(backend, member))
        assert callable(backend.scale_rows_)
    assert backends.registered(" Torch ") is backends.registered("torch")
    with pytest.raises(ValueError, match="not a registered backend"):
        backends.registered("auto")
    x = torch.randn(3, 5)
    assert backends.for_tensor(x.double()) is backends.registered("torch")
    assert (backends.for_tensor(x).name == "triton") == fusedce.uses_triton(x)
    with fusedce.use_backend("torch"):
        assert backends.small_call(x) is None  # a named backend keeps the row contract
    for name in ("get_backend", "set_backend", "use_backend", "available_backends", "select"):
        assert callable(getattr(backends, name))


def test_replaced_registers_a_backend_for_the_block():

    torch_rows = backends.registered("torch")
    rows: list[int] = []

    def counted(logits, *args, **kwargs):
        rows.append(logits.shape[0])
        return torch_rows.run_rows(logits, *args, **kwargs)

    x, target = torch.randn(40, 700), torch.randint(0, 700, (40,))  # eager rows: no compile
    counting = dataclasses.replace(torch_rows, run_rows=counted)
    with backends.replaced(counting), fusedce.use_backend("torch"):
        loss = fusedce.cross_entropy(x, target)
    assert rows and sum(rows) == 40
    assert backends.registered("torch") is torch_rows  # back after the block
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, target))


def test_core_never_imports_triton():
    """Only ``backends`` imports the Triton module (once, guarded); core asks a backend."""
    tree = ast.parse(Path(core.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(a.name for a in node.names)
    assert not any("triton" in n for n in names), sorted(names)
