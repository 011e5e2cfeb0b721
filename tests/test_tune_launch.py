"""benchmarks/tune_launch.py under the interpreter (the kernel suite's run): every launch
candidate of a tiny shape runs the real kernel and is checked against float32 torch, so the
script a GPU window runs is known to work before it gets there. Shapes: 70 classes (one short
tile, every candidate's mask) and 4099 (a prime above the interpreter's 4096-column tile)."""

from __future__ import annotations

import pytest
import torch

import fusedce
from benchmarks import tune_launch

pytestmark = pytest.mark.kernel


def test_every_candidate_runs_and_is_right(capsys: pytest.CaptureFixture[str]) -> None:
    if not fusedce.uses_triton(torch.empty(0)):
        pytest.skip("CPU tensors take the Triton kernel only under TRITON_INTERPRET=1")
    assert tune_launch.main(["--device", "cpu", "--shapes", "3x70,2x4099", "--dtypes", "fp32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fp32 |")]
    expected = len(tune_launch.candidates(70)) + len(tune_launch.candidates(4099))
    assert len(rows) == expected
    assert not any("failed" in r or "WRONG" in r for r in rows)


def test_cpu_tensors_off_the_interpreter_are_refused() -> None:
    if fusedce.uses_triton(torch.empty(0)):
        pytest.skip("under the interpreter CPU tensors do take the kernel")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        tune_launch.main(["--device", "cpu", "--shapes", "3x70"])
