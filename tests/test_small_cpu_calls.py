"""Small plain CPU calls on the default backend go to torch's ``F.cross_entropy``
(``backends.small_calls.SMALL_CPU_ELEMENTS``): same results as the float64 reference,
fusedce's own semantics where torch's differ (float32 loss for half input, a mean over nothing
is 0, a bad class index raises fusedce's IndexError), and everything else still on the row
contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from ce_reference import check, make_logits, make_target
from fusedce.backends import small_calls

pytestmark = pytest.mark.skipif(
    fusedce.uses_triton(torch.empty(1)), reason="under TRITON_INTERPRET=1 CPU calls take Triton"
)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that took the F.cross_entropy path."""
    seen = []
    real = small_calls.plain_loss

    def counted(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(small_calls, "plain_loss", counted)
    with fusedce.use_backend("auto"):
        yield seen


# (5, 7): tiny; (3, 7, 4): K-dim input, flattened by fusedce; (0, 7): an empty batch.
@pytest.mark.parametrize("shape", [(5, 7), (3, 7, 4), (0, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_small_calls_match_float64(calls, shape, dtype, reduction):
    x = make_logits(shape, dtype)
    target = make_target(shape, "hard", ignore_frac=0.3)
    check(x, target, reduction=reduction)
    check(x, target, reduction=reduction, label_smoothing=0.1, weight=torch.rand(7) + 0.5)
    check(x, target.clamp(min=0), reduction=reduction, ignore_index=2)  # a real class ignored
    assert len(calls) == 3


# Few classes and many rows take torch's K-dim layout (1, C, M): (600, 2) the binary case,
# (700, 8) the most classes that layout takes, (3, 5, 200) K-dim input flattened to 600 rows.
@pytest.mark.parametrize("shape", [(600, 2), (700, 8), (3, 5, 200)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_few_classes_many_rows_match_float64(calls, shape, dtype, reduction):
    C = shape[1]
    x = make_logits(shape, dtype)
    target = make_target(shape, "hard", ignore_frac=0.3)
    check(x, target, reduction=reduction)
    check(x, target, reduction=reduction, label_smoothing=0.1, weight=torch.rand(C) + 0.5)
    check(x, target.clamp(min=0), reduction=reduction, ignore_index=1)  # a real class ignored
    _, stats = fusedce.cross_entropy(x, target, reduction=reduction, return_stats=True)
    z = x.double().movedim(1, -1)
    torch.testing.assert_close(stats.lse.double(), torch.logsumexp(z, -1), rtol=1e-6, atol=1e-6)
    assert len(calls) == 4


def test_mean_over_nothing_is_zero(calls):
    x = make_logits((4, 7), torch.float32).requires_grad_()
    target = torch.full((4,), -100)
    loss = fusedce.cross_entropy(x, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    zero_weight = torch.zeros(7)  # weights that sum to 0 over the targets: also nothing
    assert fusedce.cross_entropy(x.detach(), torch.arange(4), zero_weight).item() == 0.0
    assert torch.isnan(F.cross_entropy(x.detach(), target))  # torch's answer differs


def test_bad_index_raises_fusedce_error(calls):
    x = make_logits((4, 7), torch.float32)
    with pytest.raises(IndexError, match="9 is out of bounds for 7 classes"):
        fusedce.cross_entropy(x, torch.tensor([0, 1, 9, 2]))


def test_what_stays_on_the_row_contract(calls):
    x = make_logits((4, 7), torch.float32)
    t = torch.tensor([0, 1, 3, 2])
    fusedce.cross_entropy(x, t, z_loss=1e-3)
    fusedce.cross_entropy(x, t, softcap=5.0, return_stats=True)
    fusedce.cross_entropy(x, make_target((4, 7), "soft"))
    fusedce.cross_entropy(x * 1.0, t, inplace_backward=True)
    fusedce.cross_entropy(make_logits((4, 1 << 14), torch.float32), t)  # past the size limit
    with fusedce.use_backend("torch"):
        fusedce.cross_entropy(x, t)
    fusedce.set_target_check(False)
    try:
        assert torch.isnan(fusedce.cross_entropy(x, torch.tensor([0, 9, 1, 2])))  # NaN, no raise
    finally:
        fusedce.set_target_check(True)
    assert calls == []


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_stats_match_the_row_contract(calls, reduction):
    x = make_logits((6, 7), torch.float32)
    x[0, 3] = float("-inf")  # a class of probability 0: its entropy term is 0, not NaN
    t = torch.tensor([0, 1, -100, 2, 6, 5])
    loss, stats = fusedce.cross_entropy(x, t, reduction=reduction, return_stats=True)
    assert len(calls) == 1
    with fusedce.use_backend("torch"):
        ref_loss, ref = fusedce.cross_entropy(x, t, reduction=reduction, return_stats=True)
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(stats, ref, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype and not got.requires_grad
        torch.testing.assert_close(got, want)
