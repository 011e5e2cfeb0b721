"""Float64 references of ``token_log_probs`` / ``linear_token_log_probs`` built from their
definitions (z = logits / T, q = softmax(z); logp = log q_y, H = -sum q log q; 0 at ignored rows),
on upcast copies, and the comparison the tests share."""

from __future__ import annotations

import torch
from torch import Tensor

# Tolerance relative to the largest reference value, by the dtype a result is written in: the
# outputs are float32 (float64 for float64 input); gradients have the input's dtype (the Triton
# interpreter truncates float32 -> bfloat16 instead of rounding: twice bfloat16's rounding step).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference(
    logits: Tensor, target: Tensor, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """(logp, entropy) in float64 of the target's shape, differentiable in ``logits`` (an upcast
    float64 tensor that requires grad)."""
    valid = target != ignore_index
    # Ignored rows may hold NaN / -inf logits: keep them out of the graph entirely.
    z = torch.where(valid[..., None], logits, 0.0) / temperature
    log_q = torch.log_softmax(z, dim=-1)
    y = torch.where(valid, target, 0).long()
    logp = log_q.gather(-1, y[..., None])[..., 0]
    q = log_q.exp()
    # 0 log 0 = 0, with a finite log where q is 0 so that autograd never forms 0 * inf.
    ent = -(q * torch.where(q > 0, log_q, 0.0)).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def close(got: Tensor, ref: Tensor, tol: float, what: str) -> None:
    """``got`` matches ``ref`` within ``tol`` relative to ref's largest magnitude (NaN nowhere)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    torch.testing.assert_close(
        got.double(), ref, rtol=tol, atol=tol * max(scale, 1.0), msg=lambda m: f"{what}: {m}"
    )
