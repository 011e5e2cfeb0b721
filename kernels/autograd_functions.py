"""The eager autograd Functions of the two losses (what runs outside ``torch.compile``).

``FusedCrossEntropy``: scalar reductions compute the gradient in forward and only scale it in
backward; ``reduction="none"`` keeps each row's log-sum-exp and writes the gradient once in
backward with the per-row factors folded in. ``LinearCrossEntropy``: the fused head's chunk loop
(``linear_chunks.py``) with its three gradients computed in forward for scalar reductions, and
recomputed with the per-row factors for ``"none"``. Both take checked, flattened tensors and a
``LossOptions``; the public functions (``cross_entropy_loss.py``,
``linear_cross_entropy_loss.py``) apply them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import core, index_check
from .linear_chunks import chunked_pass
from .options import LossOptions, accumulation_dtype


def no_double_backward(who: str) -> None:
    """Backward runs with grad mode on only under ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fusedce.{who}: double backward (create_graph=True, e.g. for a gradient penalty) "
            "is not supported; use torch.nn.functional.cross_entropy for that loss term"
        )


class FusedCrossEntropy(torch.autograd.Function):
    """Scalar reductions: the gradient computed in forward, scaled in backward. "none": forward
    keeps each row's lse, backward writes the gradient once with the per-row factors."""

    @staticmethod
    def forward(ctx, logits, target, weight, opts, inplace, token_weight, extras, who):  # type: ignore[override]
        target_grad = ctx.needs_input_grad[1]
        # The fused gradient only when the logits want one (a target alone needs none).
        grad_now = not opts.per_row and ctx.needs_input_grad[0]
        # The logits are needed in backward for the "none" gradient or the target's gradient:
        # the fused gradient may then not overwrite them.
        overwrite = inplace and grad_now and not target_grad
        with index_check.reporting_as(who):  # the deferred check keeps the name
            fwd = core.forward(
                logits,
                target,
                weight,
                opts,
                grad_now,
                inplace=overwrite,
                defer_check=True,
                token_weight=token_weight,
                extras=extras,
            )
        if overwrite:
            # The logits now hold the gradient: let autograd catch anyone who saved them.
            torch.autograd.graph.increment_version(logits)
        keep_logits = opts.per_row or target_grad
        ctx.save_for_backward(logits if keep_logits else None, target, weight, token_weight)
        ctx.opts, ctx.inplace, ctx.who = opts, inplace, who
        ctx.stats, ctx.scale, ctx.grad = fwd.stats, fwd.scale, fwd.grad
        ctx.pending_check, ctx.consumed = fwd.pending_check, False
        if not extras:
            return fwd.loss, None
        # The stats are a second, non-differentiable output; "none" returns a copy of stats[LOSS]
        # so that the two outputs do not alias.
        ctx.mark_non_differentiable(fwd.stats)
        return (fwd.loss.clone() if opts.per_row else fwd.loss), fwd.stats

    @staticmethod
    def backward(ctx, grad_output, _grad_stats=None):  # type: ignore[override]
        no_double_backward(ctx.who)
        if ctx.pending_check is not None:
            ctx.pending_check.resolve()
        if ctx.consumed:
            raise RuntimeError(
                f"fusedce.{ctx.who}: backward ran twice through the same graph "
                "(retain_graph=True). The fused gradient is consumed by the first backward; "
                "compute the loss again for a second backward."
            )
        logits, target, weight, token_weight = ctx.saved_tensors
        opts = ctx.opts
        grad_logits = grad_target = None
        if ctx.needs_input_grad[1]:
            factor = grad_output.reshape(-1) if opts.per_row else grad_output * ctx.scale
            grad_target = core.probability_target_grad(
                logits, ctx.stats, weight, opts, factor, token_weight
            ).to(target.dtype)
        if ctx.needs_input_grad[0]:
            if opts.per_row:
                out = logits if ctx.inplace else None
                grad_logits = core.gradient_from_stats(
                    logits, target, weight, opts, ctx.stats, grad_output, out, token_weight
                )
            else:
                grad_logits = ctx.grad
                core.apply_upstream_grad_(grad_logits, grad_output)
        # Scalar reductions hand their one gradient buffer over; "none" in place reuses logits.
        ctx.consumed = not opts.per_row or ctx.inplace
        ctx.grad = None
        return grad_logits, grad_target, None, None, None, None, None, None


def mean_gradient_scale(
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    x: Tensor,
    token_weight: Tensor | None = None,
) -> Tensor:
    """() device scalar: 1 / the mean normaliser over ALL rows (token weights included), or 1."""
    if not opts.mean:
        return torch.ones((), dtype=torch.float32, device=x.device)
    acc = accumulation_dtype(x.dtype)
    denom = core.mean_normaliser(target, weight, opts.ignore_index, acc, token_weight)
    return core.inverse_normaliser(denom)


class Plan:
    """How one call runs: the loss options plus the chunking (plain values, no tensors)."""

    __slots__ = ("accumulation", "chunk_rows", "extras", "opts", "who")

    def __init__(
        self,
        opts: LossOptions,
        chunk_rows: int,
        accumulation: str,
        extras: bool = False,
        who: str = "linear_cross_entropy",
    ) -> None:
        self.opts, self.chunk_rows, self.accumulation = opts, chunk_rows, accumulation
        self.extras = extras
        self.who = who  # the public function the messages name


def run_chunks(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    plan: Plan,
    scale: Tensor | None,
    needs: tuple[bool, ...],
    token_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``linear_chunks.chunked_pass`` as ``plan`` says: x (N, D), W (V, D), b (V,), target
    (N,); returns (stats (rows, N), grad_x, grad_W, grad_b), the gradients where ``needs``
    and ``scale`` (a () mean scale or (N,) upstream factors) ask for them."""
    return chunked_pass(
        x,
        W,
        b,
        target,
        weight,
        plan.opts,
        plan.chunk_rows,
        plan.accumulation,
        scale,
        needs,
        token_weight,
        plan.extras,
    )


class LinearCrossEntropy(torch.autograd.Function):
    """Scalar reductions: gradients computed in forward, scaled in backward. "none": recompute."""

    @staticmethod
    def forward(ctx, x, W, b, target, weight, plan, token_weight):  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.plan = plan
        if plan.opts.per_row:
            # Per-token upstream gradients are only known in backward: recompute there.
            stats, *_ = run_chunks(x, W, b, target, weight, plan, None, needs, token_weight)
            ctx.save_for_backward(x, W, b, target, weight, token_weight)
            loss, scale = stats[core.LOSS].clone(), None
        else:
            scale = mean_gradient_scale(target, weight, plan.opts, x, token_weight)
            head = (x, W, b, target, weight)
            stats, gx, gw, gb = run_chunks(*head, plan, scale, needs, token_weight)
            ctx.grads = [gx, gw, gb]
            loss = core.reduce_rows(stats[core.LOSS], scale, plan.opts)
        ctx.mark_non_differentiable(*(t for t in (stats, scale) if t is not None))
        return loss, stats, scale

    @staticmethod
    def backward(ctx, grad_output, _grad_stats=None, _grad_scale=None):  # type: ignore[override]
        plan = ctx.plan
        no_double_backward(plan.who)
        if plan.opts.per_row:
            x, W, b, target, weight, token_weight = ctx.saved_tensors
            needs = tuple(ctx.needs_input_grad[:3])
            factor = grad_output.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous()
            # The stats are not needed again: recompute without the extras.
            replan = Plan(plan.opts, plan.chunk_rows, plan.accumulation, who=plan.who)
            _, gx, gw, gb = run_chunks(x, W, b, target, weight, replan, factor, needs, token_weight)
            return gx, gw, gb, None, None, None, None
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                f"fusedce.{plan.who}: backward ran twice through the same graph "
                "(retain_graph=True). The fused gradients are consumed by the first backward; "
                "compute the loss again for a second backward."
            )
        ctx.grads = None
        for grad in grads:
            if grad is not None:
                # In place, and without a host sync on CUDA: a factor of exactly 1 moves no data.
                core.apply_upstream_grad_(
                    grad.reshape(1, -1) if grad.dim() == 1 else grad, grad_output
                )
        return grads[0], grads[1], grads[2], None, None, None, None
