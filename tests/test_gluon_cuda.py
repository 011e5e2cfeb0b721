"""The experimental shared-memory kernel (Gluon, Hopper only) against torch in float64.

Marked ``gpu`` and ``gluon``: skipped without a Hopper GPU. ``benchmarks/gpu_check.sh`` runs
this file in a process of its own, so that a fault in the experimental kernel cannot take the
other CUDA tests down with it.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fusedce
from ce_reference import check, make_logits, make_target

pytestmark = [pytest.mark.gpu, pytest.mark.gluon]
DEV = "cuda"


@pytest.fixture
def gluon_path(monkeypatch):
    """Turns the opt-in path on (as FUSEDCE_GLUON=1 would) and counts its launches."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the shared-memory kernel targets Hopper (sm_90)")
    gk = pytest.importorskip("fusedce.gluon_cross_entropy")
    ce = sys.modules["fusedce.cross_entropy"]
    calls = []
    launcher = gk.cross_entropy_fwd_bwd_gluon

    def counted(*args):
        calls.append(args[0].shape)
        return launcher(*args)

    monkeypatch.setattr(gk, "cross_entropy_fwd_bwd_gluon", counted)
    monkeypatch.setattr(ce, "gluon_cross_entropy", gk, raising=False)
    monkeypatch.setattr(ce, "_GLUON", True)
    return calls


# V: one tile; ragged last tile; 32000 (LLM vocabulary, 64 KB bf16 rows); 50256 (ragged, 16 | V);
# 65536 (bf16: 128 KB of shared memory per row).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("V", [16, 1040, 32000, 50256, 65536])
def test_cuda_gluon_smem_path_matches_float64(gluon_path, V, dtype):
    if dtype == torch.float32 and V > 40960:
        pytest.skip("a float32 row this long does not fit the shared-memory budget")
    x = make_logits((37, V), dtype, device=DEV)
    target = make_target((37, V), "hard", ignore_frac=0.2)
    check(x, target, reduction="none", label_smoothing=0.1)
    check(x, target, reduction="mean")
    check(x, target, reduction="sum", grad=False)
    assert len(gluon_path) == 3  # every call took the shared-memory kernel


def test_cuda_gluon_inplace_and_bad_index(gluon_path):
    x = make_logits((64, 32000), torch.bfloat16, device=DEV).requires_grad_()
    h = x * 1.0
    target = torch.randint(0, 32000, (64,), device=DEV)
    loss = fusedce.cross_entropy(h, target, inplace_backward=True)
    loss.backward()
    ref = torch.softmax(x.detach().double(), 1)
    ref[torch.arange(64), target] -= 1
    assert (x.grad.double() - ref / 64).norm() <= 1e-2 * (ref / 64).norm()
    fusedce.set_target_check(False)
    try:
        bad = target.clone()
        bad[5] = 40000
        out = fusedce.cross_entropy(x.detach(), bad, reduction="none")
        torch.cuda.synchronize()
        assert torch.isnan(out[5]) and torch.isfinite(out[torch.arange(64) != 5]).all()
    finally:
        fusedce.set_target_check(True)
    assert len(gluon_path) == 2


def test_cuda_gluon_declines_what_it_does_not_cover(gluon_path):
    """Weights, probabilities, V not divisible by 16, rows too long: the portable kernel."""
    x = make_logits((8, 1001), torch.bfloat16, device=DEV)
    check(x, make_target((8, 1001), "hard"))
    y = make_logits((8, 1024), torch.bfloat16, device=DEV)
    check(y, make_target((8, 1024), "hard"), weight=torch.rand(1024) + 0.5)
    check(y, make_target((8, 1024), "soft"))
    z = make_logits((2, 128256), torch.bfloat16, device=DEV)
    check(z, make_target((2, 128256), "hard"))
    assert gluon_path == []
