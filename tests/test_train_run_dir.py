"""The run directory's root and name are checked up front: a root that cannot hold a run, or a
name that another run already holds, is one line on stderr and exit code 2, and nothing is
written (real ``python train.py`` processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_edges import TINY, train

from fusedce.lightning_modules.errors import TrainError
from fusedce.lightning_modules.run_dir import check_run_root


def _one_line_error(proc, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # Lightning's "Seed set to ..." may come first; the error itself is one line.
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["missing_parent", "file"])
def test_bad_run_root_is_one_line(kind: str, tmp_path: Path) -> None:
    if kind == "file":
        root = tmp_path / "a_file"
        root.write_text("not a directory")
    else:  # /proc accepts no new directories, for any user
        root = Path("/proc/fusedce-no-such-dir")
    proc = train(["--run.root", str(root), "--trainer.max_steps", "1", *TINY], tmp_path / "runs")
    _one_line_error(proc, "--run.root", str(root))
    assert not (tmp_path / "runs").exists()


def test_second_run_with_the_same_name_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["--run.name", "mine", "--trainer.max_steps", "2", *TINY]
    first = train(args, runs)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    proc = train(args, runs)
    _one_line_error(proc, "--run.name mine", "already holds a run")
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before  # nothing written


def test_check_run_root_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks themselves: a fresh root is created; a full disk is refused with the KiB free."""
    check_run_root(tmp_path / "new" / "root")
    assert (tmp_path / "new" / "root").is_dir()
    import fusedce.lightning_modules.run_dir as run_dir

    monkeypatch.setattr(run_dir, "MIN_FREE_BYTES", 1 << 62)  # more than any disk has
    with pytest.raises(TrainError, match="KiB free"):
        check_run_root(tmp_path)
