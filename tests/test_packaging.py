"""Packaging: the installed layout is the one package `fusedce`, whatever the repository calls its
directories.

The repository keeps `kernels/`, `lightning_modules/` and `datamodules/` at its top level, and
pyproject.toml maps them onto `fusedce`, `fusedce.lightning_modules` and `fusedce.datamodules`.
These tests build a real wheel and install it, so a mapping that leaks a top-level `kernels`
(which would clash with Hugging Face's `kernels` package), drops a module, or pulls the training
stack into a plain `import fusedce` fails here rather than on a user's machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# Repository directory -> installed package directory (inside the wheel).
PACKAGE_DIRS = {
    "kernels": "fusedce",
    "lightning_modules": "fusedce/lightning_modules",
    "datamodules": "fusedce/datamodules",
}
TRAIN_ONLY = {"lightning", "wandb", "matplotlib", "jsonargparse", "torchmetrics", "optuna"}
# Modules a plain `import fusedce` must not load: they belong to the [train] extra.
TRAIN_MODULES = ("lightning", "pytorch_lightning", "wandb", "matplotlib", "torchmetrics", "optuna")


def _pip(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout without build outputs.

    Building in place would write build/ into the repository, and a stale build/lib (say, a module
    since renamed) would end up in the wheel.
    """
    dst = tmp_path_factory.mktemp("src") / "fusedce"
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "wandb",
        "runs",
        "lightning_logs",
        ".whl",
        ".gl",
    )
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from the checkout (path to the .whl file)."""
    out = tmp_path_factory.mktemp("wheel")
    args = ["wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    # The build backend needs setuptools>=77 (PEP 639 license field): use the environment's own
    # where it is recent enough (no download), an isolated build environment otherwise.
    try:
        recent = Version(importlib.metadata.version("setuptools")) >= Version("77")
    except importlib.metadata.PackageNotFoundError:
        recent = False
    if recent:
        args.insert(1, "--no-build-isolation")
    proc = _pip(*args)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("fusedce-*.whl"))
    assert len(wheels) == 1, f"expected one fusedce wheel, got {os.listdir(out)}"
    return wheels[0]


# Why: the wheel must hold the package `fusedce` only (no generic top-level `kernels`,
# `lightning_modules`, `datamodules` in site-packages), every module of the three source
# directories, and keep the training stack's requirements behind the [train] extra.
def test_wheel_holds_only_fusedce_and_train_deps_behind_extra(wheel: Path, source: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        top_level = zf.read(f"{dist_info}/top_level.txt").decode().split()

    tops = {n.split("/")[0] for n in names}
    assert tops == {"fusedce", dist_info}, f"unexpected top-level entries: {sorted(tops)}"
    assert top_level == ["fusedce"]
    for leaked in ("kernels", "lightning_modules", "datamodules"):
        assert not any(n.startswith(f"{leaked}/") for n in names), f"wheel ships {leaked}/"

    # Every module of the source directories lands under its fusedce name (a new subpackage
    # missing from [tool.setuptools] packages would be silently left out).
    expected = {
        f"{pkg}/{path.relative_to(source / src).as_posix()}"
        for src, pkg in PACKAGE_DIRS.items()
        for path in (source / src).rglob("*.py")
    }
    shipped = {n for n in names if n.endswith(".py")}
    assert "fusedce/__init__.py" in shipped
    assert "fusedce/lightning_modules/__init__.py" in shipped
    assert "fusedce/datamodules/__init__.py" in shipped
    missing = expected - shipped
    assert not missing, f"modules left out of the wheel: {sorted(missing)}"

    assert metadata["Name"] == "fusedce"
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    base = {
        r.name.lower() for r in requirements if r.marker is None or "extra" not in str(r.marker)
    }
    assert base == {"torch", "triton"}, f"plain install requires {sorted(base)}"
    train = {
        r.name.lower()
        for r in requirements
        if r.marker is not None and r.marker.evaluate({"extra": "train"}) and r.name not in base
    }
    assert train == TRAIN_ONLY, f"[train] extra requires {sorted(train)}"
    assert "train" in (metadata.get_all("Provides-Extra") or [])


def _index_reachable() -> str | None:
    """None where the package index answers, else why not."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/kernels/", timeout=10) as resp:
            resp.read(1)
    except OSError as exc:
        return f"package index {index} unreachable ({exc}): cannot install Hugging Face's kernels"
    return None


_BESIDE_HF_KERNELS = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    site = Path(sys.argv[1]).resolve()
    import kernels

    import fusedce
    import torch

    assert Path(kernels.__file__).resolve().is_relative_to(site / "kernels"), kernels.__file__
    assert Path(fusedce.__file__).resolve().is_relative_to(site / "fusedce"), fusedce.__file__
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {modules})
    assert not loaded, f"import fusedce loaded training-stack modules: {{loaded}}"

    torch.manual_seed(0)
    logits = torch.randn(16, 37, requires_grad=True)
    target = torch.randint(0, 37, (16,))
    ref_logits = logits.detach().clone().requires_grad_(True)
    loss = fusedce.cross_entropy(logits, target)
    ref = torch.nn.functional.cross_entropy(ref_logits, target)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    print("ok")
    """
).format(modules=set(TRAIN_MODULES))


# Why: Hugging Face's `kernels` package is a common neighbour of a loss library; installed beside
# it, fusedce must neither shadow it nor be shadowed, and must work with torch + triton alone.
def test_installs_beside_hugging_face_kernels(wheel: Path, tmp_path: Path) -> None:
    reason = _index_reachable()
    if reason is not None:
        pytest.skip(reason)
    site = tmp_path / "site"
    # Hugging Face's package with its own requirements (no torch among them), then the wheel
    # without its requirements: torch and triton come from this environment.
    proc = _pip("install", "-q", "--no-compile", "--target", str(site), "kernels")
    assert proc.returncode == 0, f"pip install kernels failed:\n{proc.stdout}\n{proc.stderr}"
    assert not (site / "torch").exists(), "kernels pulled in its own torch"
    proc = _pip("install", "-q", "--no-compile", "--no-deps", "--target", str(site), str(wheel))
    assert proc.returncode == 0, f"pip install wheel failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "kernels" / "__init__.py").is_file()
    assert (site / "fusedce" / "__init__.py").is_file()

    # cwd is the temporary directory: the repository's own kernels/ must not be on sys.path.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _BESIDE_HF_KERNELS, str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.strip().endswith("ok")


_IMPORT_PATHS = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import fusedce
    import fusedce.datamodules
    import fusedce.lightning_modules
    import torch

    assert callable(torch.ops.fusedce.cross_entropy)
    stray = sorted(m for m in ("kernels", "lightning_modules", "datamodules") if m in sys.modules)
    assert not stray, f"modules loaded under their repository names: {stray}"
    dirs = [Path.cwd().resolve() / d for d in ("kernels", "lightning_modules", "datamodules")]
    seen = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and any(Path(file).resolve().is_relative_to(d) for d in dirs):
            other = seen.setdefault(Path(file).resolve(), name)
            assert other == name, f"{file} loaded twice, as {other} and {name}"
    print("ok")
    """
)


# Why: a module loaded twice under two names (say `kernels.cross_entropy` next to
# `fusedce.cross_entropy`) registers `torch.ops.fusedce.*` twice and torch raises. The
# subprocess runs in the repository root, where such a stray `import kernels` would succeed.
def test_custom_op_registered_once_across_import_paths() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "fusedce::" not in proc.stderr, proc.stderr
    assert proc.stdout.strip().endswith("ok")
