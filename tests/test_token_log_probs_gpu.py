"""``token_log_probs`` / ``linear_token_log_probs`` on a real GPU, against float64 references:
the Triton row kernel forward, both backward launches (the cross-entropy's gradient-only launch
and the entropy's extra pass), LLM-sized vocabularies, no host sync in backward, Inductor.

Marker ``gpu``: skipped automatically where CUDA is absent (tests/conftest.py); the CPU suite
(tests/test_token_log_probs.py) covers the edge inputs on small shapes.
"""

from __future__ import annotations

import pytest
import torch

import fusedce
from log_prob_reference import TOL, close, reference

pytestmark = pytest.mark.gpu
DEV = "cuda"
IGNORE = -100


# Why each V: one tile held in registers; a prime above the gradient kernel's 4096-column tile
# and the row kernel's one-tile limit (two sweeps, ragged tail); an LLM vocabulary.
@pytest.mark.parametrize("V", [1000, 32771, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_form_on_gpu(V: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device=DEV).manual_seed(V)
    N = 64
    x = (torch.randn(N, V, device=DEV, generator=g) * 4 + 100).to(dtype)
    y = torch.randint(V, (N,), device=DEV, generator=g)
    y[::7] = IGNORE
    x[7] = float("nan")  # an ignored row
    g_lp, g_h = torch.randn(2, N, device=DEV, generator=g, dtype=torch.float64)
    x64 = x.double().requires_grad_()
    ref_lp, ref_h = reference(x64, y, 0.7, IGNORE)
    ((ref_lp * g_lp).sum() + (ref_h * g_h).sum()).backward()
    leaf = x.clone().requires_grad_()
    lp, h = fusedce.token_log_probs(leaf, y, temperature=0.7, return_entropy=True)
    close(lp, ref_lp.detach(), TOL[torch.float32] * 5, "logp")
    close(h, ref_h.detach(), TOL[torch.float32] * 5, "entropy")
    ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
    close(leaf.grad, x64.grad, TOL[dtype] / 2, "grad (both)")
    # logp alone: the cross-entropy's gradient launch.
    leaf.grad = None
    x64.grad = None
    (fusedce.token_log_probs(leaf, y, temperature=0.7) * g_lp.float()).sum().backward()
    ref_lp, _ = reference(x64, y, 0.7, IGNORE)
    (ref_lp * g_lp).sum().backward()
    close(leaf.grad, x64.grad, TOL[dtype] / 2, "grad (logp alone)")


def test_linear_head_on_gpu_matches_float64_and_never_syncs_in_backward() -> None:
    g = torch.Generator(device=DEV).manual_seed(1)
    N, D, V = 512, 256, 50257
    x = torch.randn(N, D, device=DEV, generator=g).bfloat16().requires_grad_()
    W = (torch.randn(V, D, device=DEV, generator=g) / D**0.5).bfloat16().requires_grad_()
    y = torch.randint(V, (N,), device=DEV, generator=g)
    y[::5] = IGNORE
    adv = torch.randn(N, device=DEV, generator=g)
    lp, h = fusedce.linear_token_log_probs(x, W, y, temperature=0.9, chunk_size=128)
    loss = -(adv * lp).mean() - 0.01 * h.mean()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    refs = [t.detach().double().requires_grad_() for t in (x, W)]
    r_lp, r_h = reference(refs[0] @ refs[1].t(), y, 0.9, IGNORE)
    (-(adv.double() * r_lp).mean() - 0.01 * r_h.mean()).backward()
    close(lp, r_lp.detach(), TOL[torch.bfloat16], "logp")
    close(h, r_h.detach(), TOL[torch.bfloat16], "entropy")
    close(x.grad, refs[0].grad, TOL[torch.bfloat16], "grad_input")
    close(W.grad, refs[1].grad, TOL[torch.bfloat16], "grad_weight")


def test_inductor_fullgraph_on_gpu() -> None:
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(32, 64, device=DEV, generator=g)
    W = torch.randn(4099, 64, device=DEV, generator=g)
    y = torch.randint(4099, (32,), device=DEV, generator=g)

    def step(x, W):
        lp, h = fusedce.linear_token_log_probs(x, W, y, chunk_size=16)
        lp2, h2 = fusedce.token_log_probs(x @ W.t(), y, return_entropy=True)
        return (lp * 0.3 - h).sum() + (lp2 - 0.1 * h2).sum()

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (x, W)]
        loss = fn(*leaves)
        loss.backward()
        outs.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
