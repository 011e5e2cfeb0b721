"""The torch backend on the CPU works through the rows in blocks
(``backends.torch_ops.CPU_ROW_BLOCK_BYTES``): every option must give the float64 reference
whatever the block size, with ragged last blocks, per-row scales ("none"), the gradient-only
pass, token weights and in-place gradients. The calls are counted through
``backends.replaced``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fusedce
from ce_reference import check, check_extras, make_logits, make_target
from fusedce import backends
from fusedce.backends import torch_ops

# 11 rows of 37 classes: blocks of 1 row (every row alone) and of 4 rows (a ragged last block of
# 3), in float32 (no copy) and bfloat16 (the upcast copy is per block).
BLOCK_ROWS = [1, 4]
DTYPES = [torch.float32, torch.bfloat16]
N, V = 11, 37


@pytest.fixture(params=BLOCK_ROWS, ids=lambda r: f"{r}rows")
def small_blocks(request, monkeypatch):
    """Blocks of ``rows`` rows; yields the row count of every backend call made."""
    # Bytes per row of float32 work: a budget of `rows` rows.
    monkeypatch.setattr(torch_ops, "CPU_ROW_BLOCK_BYTES", request.param * V * 4)
    torch_rows = backends.registered("torch")
    seen: list[int] = []

    def counted(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return torch_rows.run_rows(logits, *args, **kwargs)

    counting = dataclasses.replace(torch_rows, run_rows=counted)
    with backends.replaced(counting), fusedce.use_backend("torch"):
        yield seen
    assert seen and max(seen) <= request.param  # every call got one block at most


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_blocks_match_float64(small_blocks, kind, reduction, dtype):
    x = make_logits((N, V), dtype)
    target = make_target((N, V), kind, ignore_frac=0.3 if kind == "hard" else 0.0)
    check(x, target, reduction=reduction, label_smoothing=0.1, weight=torch.rand(V) + 0.5)
    check_extras(
        x,
        target,
        reduction=reduction,
        logit_scale=1.7,
        softcap=6.0,
        z_loss=0.02,
        token_weight=True,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_blocks_in_place(small_blocks, reduction):
    x = make_logits((N, V), torch.bfloat16)
    check_extras(x, make_target((N, V), "hard", ignore_frac=0.3), reduction=reduction, inplace=True)


def test_blocks_of_the_linear_head(small_blocks):
    # The fused head's own chunks are split again into row blocks.
    torch.manual_seed(0)
    h = torch.randn(N, 8, dtype=torch.float64)
    W = torch.randn(V, 8, dtype=torch.float64)
    t = make_target((N, V), "hard", ignore_frac=0.3)
    hs, Ws = (h.float().requires_grad_(), W.float().requires_grad_())
    loss = fusedce.linear_cross_entropy(hs, Ws, t, label_smoothing=0.1)
    loss.backward()
    h64, W64 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ W64.T, t, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Ws.grad.double(), W64.grad, rtol=1e-4, atol=1e-6)
