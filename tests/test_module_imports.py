"""The import structure of the package: every module imports on its own, no module imports
another inside a function (the usual way to hide an import cycle), and the module-level imports
of kernels/ form no cycle.

Why: the layering (``fusedce.sharded`` below the plain functions, ``fusedce.vocab_parallel``
above both) holds only while nothing imports upwards; a function-level import would hide such
an import until the call that runs it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
PACKAGE = "fusedce"  # kernels/ is installed as fusedce


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(KERNELS).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


MODULES = {_module_name(p): p for p in sorted(KERNELS.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module of ``from ... import`` in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement of ``module`` runs (others are dropped)."""
    found = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        uses_root = PACKAGE in names
    else:
        source = _resolve(module, node)
        # ``from pkg import submodule`` imports the submodule too.
        subs = [f"{source}.{alias.name}" for alias in node.names]
        names = [source, *subs]
        uses_root = source == PACKAGE and any(sub not in MODULES for sub in subs)
    # A module's own enclosing packages are already being imported when it runs: importing a
    # sibling submodule through them (``from . import sibling``) adds no edge to them; taking a
    # name defined in their __init__ does.
    parts_of_module = module.split(".")
    ancestors = {".".join(parts_of_module[:k]) for k in range(1, len(parts_of_module))}
    takes_attr = (
        isinstance(node, ast.ImportFrom)
        and _resolve(module, node) in ancestors
        and any(f"{_resolve(module, node)}.{alias.name}" not in MODULES for alias in node.names)
    )
    for name in names:
        # Importing a.b.c runs the package __init__ of a.b first; the root's is the top layer
        # (it imports everything), so that implicit edge to it is no cycle.
        parts = name.split(".")
        for k in range(2, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix in ancestors and not (takes_attr and prefix == _resolve(module, node)):
                continue
            if prefix in MODULES and prefix != module:
                found.append(prefix)
    if uses_root and module != PACKAGE:  # a name of the root's namespace: an explicit edge
        found.append(PACKAGE)
    return found


def _function_level_imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Each import inside a function body, with whether it sits in the body of a ``try``."""
    out = []

    def visit(node: ast.AST, in_function: bool, in_try: bool) -> None:
        for field, value in ast.iter_fields(node):
            for child in value if isinstance(value, list) else [value]:
                if not isinstance(child, ast.AST):
                    continue
                child_try = in_try or (isinstance(node, ast.Try) and field == "body")
                if isinstance(child, ast.Import | ast.ImportFrom) and in_function:
                    out.append((child, child_try))
                functions = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
                visit(child, in_function or isinstance(child, functions), child_try)

    visit(tree, False, False)
    return out


def _module_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    out = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                out.append(child)
            visit(child)

    visit(tree)
    return out


def test_no_import_inside_functions() -> None:
    """No function imports a module of the package; an import of an optional third-party
    module (triton, torch.distributed.tensor, private torch internals) inside a function says
    why, in a comment on its line or the line above, or sits in a ``try`` that handles its
    absence."""
    bad = []
    for name, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for node, in_try in _function_level_imports(ast.parse(source)):
            where = f"{path.relative_to(KERNELS.parent)}:{node.lineno}"
            ours = bool(_imported(name, node)) or (
                isinstance(node, ast.ImportFrom) and node.level > 0
            )
            if ours:
                bad.append(f"{where}: imports a module of the package inside a function")
                continue
            line, above = lines[node.lineno - 1], lines[node.lineno - 2].lstrip()
            commented = "#" in line or above.startswith("#")
            if not (commented or in_try):
                bad.append(f"{where}: a function-level import without a comment saying why")
    assert not bad, "\n".join(bad)


def test_module_imports_form_no_cycle() -> None:
    graph = {
        name: {
            dep
            for node in _module_level_imports(ast.parse(path.read_text()))
            for dep in _imported(name, node)
        }
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_layering_of_the_sharded_path() -> None:
    """``fusedce.sharded`` never imports the plain functions nor ``fusedce.vocab_parallel``
    (they import it)."""
    above = ("fusedce.cross_entropy_loss", "fusedce.linear_cross_entropy_loss", "fusedce")
    for name, path in MODULES.items():
        if not name.startswith("fusedce.sharded"):
            continue
        for node in _module_level_imports(ast.parse(path.read_text())):
            for dep in _imported(name, node):
                assert dep not in above and not dep.startswith("fusedce.vocab_parallel"), (
                    f"{name} imports {dep}"
                )


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Each module file of kernels/, imported in turn in a fresh interpreter (importing one
    runs the package's __init__ first, so a cycle or a missing name fails here)."""
    code = textwrap.dedent(
        """
        import importlib, sys, traceback
        failed = []
        for name in sys.argv[1:]:
            try:
                importlib.import_module(name)
            except Exception:
                failed.append(name + ":\\n" + traceback.format_exc())
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    names = sorted(MODULES)
    done = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_and_an_eager_call_leave_dynamo_unimported() -> None:
    """``import fusedce`` and an eager forward + backward never import ``torch._dynamo``
    (about 1 s): only torch.compile needs it, and imports it itself. A decorator such as
    ``torch.compiler.disable`` applied at import time would (the sharded calls apply it at
    their first call)."""
    code = textwrap.dedent(
        """
        import sys, torch
        import fusedce
        x = torch.randn(4, 5, requires_grad=True)
        fusedce.cross_entropy(x, torch.tensor([0, 1, 2, 3])).backward()
        print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# Slow: importing any fusedce module runs the package's __init__ first, which imports them all,
# so each of these processes repeats test_every_module_imports_in_a_fresh_interpreter (and the
# order of the imports is test_module_imports_form_no_cycle's graph).
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n for n in sorted(MODULES) if n.startswith(("fusedce.sharded", "fusedce.vocab"))]
)
def test_vocab_parallel_modules_import_alone(name: str) -> None:
    """Each module of the vocabulary-parallel layers as the first thing a process imports."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


# The modules whose private ``@triton.jit`` names other kernel modules import.
JIT_SOURCES = ("fusedce.backends.triton_jit", "fusedce.backends.triton_distill")


def _module_aliases(name: str, tree: ast.AST) -> dict[str, str]:
    """The names under which module ``name`` holds other modules of the package (``from . import
    dtensor``, ``from .. import index_check as checks``), with the module each stands for."""
    aliases = {}
    for node in _module_level_imports(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(name, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    return aliases


def test_no_private_name_crosses_a_module() -> None:
    """What one module of the package takes from another is public there (no leading
    underscore), imported by name or read as an attribute of the imported module: a private
    name is free to change inside its module. The Triton kernels keep the ``_snake_case`` names
    of Triton's convention; their launchers import them."""
    triton_modules = ("fusedce.backends.triton_jit", "fusedce.backends.triton_distill")
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        where = path.relative_to(KERNELS.parent)
        for node in _module_level_imports(tree):
            if not isinstance(node, ast.ImportFrom) or not _imported(name, node):
                continue
            source = _resolve(name, node)
            private = [
                a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
            ]
            if private and source not in triton_modules:
                bad.append(f"{where}:{node.lineno}: {private}")
        aliases = _module_aliases(name, tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{where}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)
