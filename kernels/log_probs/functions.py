"""The eager autograd Functions of ``token_log_probs`` / ``linear_token_log_probs``, and their
definitions in differentiable torch ops for ``torch.func`` transforms.

Ungiven upstream gradients stay None (``set_materialize_grads(False)``): an entropy that no
gradient reaches costs nothing in backward. Backward runs with grad mode on only under
``create_graph=True``, which these functions refuse (``no_double_backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import index_check
from ..options import accumulation_dtype
from .head import head_backward, head_forward
from .rows import forward_rows, grad_rows, row_options


def no_double_backward(who: str) -> None:
    """Raises RuntimeError where backward itself is being differentiated."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fusedce.{who}: double backward (create_graph=True) is not supported; compute "
            "log_softmax with torch ops for that term"
        )


def differentiable(
    logits: Tensor, target: Tensor, temperature: float, ignore_index: int, entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """The definitions in differentiable torch ops, for ``torch.func`` transforms (grad, vmap,
    jacrev: the autograd Functions and custom ops do not take them). (M, V) logits, (M,)
    targets; the same semantics (float32 or wider, 0 and no gradient at ignored rows)."""
    valid = target != ignore_index
    z = logits.to(accumulation_dtype(logits.dtype)) / temperature
    # Ignored rows may hold NaN: keep them out of the softmax (and of every gradient).
    log_q = torch.log_softmax(torch.where(valid[:, None], z, 0.0), dim=-1)
    y = torch.where(valid, target.long(), 0)
    logp = torch.where(valid, log_q.gather(1, y[:, None])[:, 0], 0.0)
    if not entropy:
        return logp, None
    q = log_q.exp()
    h = -(q * torch.where(q > 0, log_q, 0.0)).sum(-1)
    return logp, torch.where(valid, h, 0.0)


class TokenLogProbs(torch.autograd.Function):
    """(M, V) logits, (M,) targets -> logp (M,) (and the entropy (M,) with ``entropy``)."""

    @staticmethod
    def forward(ctx, logits, target, temperature, ignore_index, entropy, who):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        opts = row_options(ignore_index, temperature)
        with index_check.reporting_as(who):  # the deferred check keeps the name
            fwd = forward_rows(logits, target, opts, entropy, defer_check=True)
        ctx.save_for_backward(logits, target, fwd.stats)
        ctx.opts, ctx.who, ctx.pending = opts, who, fwd.pending_check
        return (fwd.logp, fwd.entropy) if entropy else fwd.logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        no_double_backward(ctx.who)
        if ctx.pending is not None:
            ctx.pending.resolve()
        logits, target, stats = ctx.saved_tensors
        grad = grad_rows(logits, target, ctx.opts, stats, grad_logp, grad_entropy)
        return grad, None, None, None, None, None


class LinearTokenLogProbs(torch.autograd.Function):
    """(N, D) hidden states, (V, D) weight, (V,) bias or None, (N,) targets -> logp (N,) (and
    the entropy (N,)), chunk by chunk (``head``)."""

    @staticmethod
    def forward(ctx, x, W, b, target, temperature, ignore_index, entropy, chunk_rows, who):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        opts = row_options(ignore_index, temperature)
        logp, ent, stats = head_forward(x, W, b, target, opts, chunk_rows, entropy)
        ctx.save_for_backward(x, W, b, target, stats)
        ctx.opts, ctx.who, ctx.chunk_rows = opts, who, chunk_rows
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        no_double_backward(ctx.who)
        x, W, b, target, stats = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        gx, gw, gb = head_backward(
            x, W, b, target, ctx.opts, stats, grad_logp, grad_entropy, ctx.chunk_rows, needs
        )
        return gx, gw, gb, None, None, None, None, None, None
