"""The ``torch.library`` custom ops of ``token_log_probs`` / ``linear_token_log_probs``: what
``torch.compile`` sees (the eager path takes the autograd Functions of ``functions``).

``fusedce::token_log_probs`` and ``fusedce::linear_token_log_probs`` return (logp, entropy or an
empty tensor, row statistics); their backward ops (``..._backward``) recompute the gradient from
the saved statistics. Every output is contiguous, and so are the fakes: a fake whose strides
differed from the real op's would make the compiled graph read the wrong elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import index_check
from ..index_check import check_class_indices
from ..options import accumulation_dtype, index_target_for_kernels
from ..stat_rows import EXTRA_STAT_ROWS, STAT_ROWS
from .functions import no_double_backward
from .head import head_backward, head_forward
from .rows import forward_rows, grad_rows, row_options

WHO = "token_log_probs"
LINEAR_WHO = "linear_token_log_probs"


def _acc_empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=accumulation_dtype(like.dtype))


def _outputs(
    logp: Tensor, ent: Tensor | None, stats: Tensor, like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """An op's outputs: an empty entropy where none was asked (an op returns no None)."""
    return logp, ent if ent is not None else _acc_empty(like), stats


def _fake_outputs(like: Tensor, entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The forward ops' fakes: (M,) logp, (M,) or empty entropy, (rows, M) statistics of the
    accumulation dtype, for the M rows of ``like`` (the logits or the hidden states)."""
    M, acc = like.shape[0], accumulation_dtype(like.dtype)
    rows = EXTRA_STAT_ROWS if entropy else STAT_ROWS
    ent = like.new_empty((M,) if entropy else (0,), dtype=acc)
    return like.new_empty((M,), dtype=acc), ent, like.new_empty((rows, M), dtype=acc)


def _save(ctx, tensors: tuple[Tensor | None, ...], args: tuple, entropy: bool, who: str) -> None:
    """What a forward op's backward reads: its tensors (the statistics last), the options it
    passes on to the backward op (``args``), whether an entropy was returned, ``who``."""
    ctx.args, ctx.entropy, ctx.who = args, entropy, who
    ctx.save_for_backward(*tensors)


def _entropy_grad(ctx, grad_entropy: Tensor | None) -> Tensor | None:
    """The entropy's upstream gradient where the entropy was asked for (not the empty one)."""
    no_double_backward(ctx.who)
    return grad_entropy if ctx.entropy else None


@torch.library.custom_op("fusedce::token_log_probs", mutates_args=())
def token_log_probs_op(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    temperature: float,
    entropy: bool,
    who: str = WHO,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp (M,), entropy (M,) or empty, row stats (STAT_ROWS or EXTRA_STAT_ROWS, M)) of (M, V)
    logits of any strides."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    target = index_target_for_kernels(target, ignore_index)
    with index_check.reporting_as(who):
        fwd = forward_rows(logits, target, row_options(ignore_index, temperature), entropy)
    return _outputs(fwd.logp, fwd.entropy, fwd.stats, logits)


token_log_probs_op.register_fake(lambda logits, *args, **_kw: _fake_outputs(logits, args[3]))


@torch.library.custom_op("fusedce::token_log_probs_backward", mutates_args=())
def _token_log_probs_backward_op(
    logits: Tensor,
    target: Tensor,
    stats: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    ignore_index: int,
    temperature: float,
) -> Tensor:
    """The (M, V) gradient, contiguous, from the forward's row stats."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    target = index_target_for_kernels(target, ignore_index)
    opts = row_options(ignore_index, temperature)
    return grad_rows(logits, target, opts, stats.contiguous(), grad_logp, grad_entropy)


@_token_log_probs_backward_op.register_fake
def _(logits, *_args, **_kwargs):
    return logits.new_empty(logits.shape)


def _tlp_setup(ctx, inputs, output):
    logits, target, ignore_index, temperature, entropy, who = inputs
    _save(ctx, (logits, target, output[2]), (ignore_index, temperature), entropy, who)


def _tlp_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    g_h = _entropy_grad(ctx, grad_entropy)
    grad = _token_log_probs_backward_op(*ctx.saved_tensors, grad_logp, g_h, *ctx.args)
    return grad, None, None, None, None, None


token_log_probs_op.register_autograd(_tlp_backward, setup_context=_tlp_setup)


@torch.library.custom_op("fusedce::linear_token_log_probs", mutates_args=())
def linear_token_log_probs_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    ignore_index: int,
    temperature: float,
    entropy: bool,
    chunk_rows: int,
    who: str = LINEAR_WHO,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp (N,), entropy (N,) or empty, row stats) of the head x @ W.T + b, chunked."""
    check_class_indices(target, W.shape[0], ignore_index, who)
    x = x.contiguous()
    target = index_target_for_kernels(target, ignore_index)
    opts = row_options(ignore_index, temperature)
    return _outputs(*head_forward(x, W, b, target, opts, chunk_rows, entropy), x)


linear_token_log_probs_op.register_fake(lambda x, *args, **_kw: _fake_outputs(x, args[5]))


@torch.library.custom_op("fusedce::linear_token_log_probs_backward", mutates_args=())
def _linear_token_log_probs_backward_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    stats: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    ignore_index: int,
    temperature: float,
    chunk_rows: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_W, grad_b), contiguous, empty where not needed: the chunks recomputed."""
    x = x.contiguous()
    target = index_target_for_kernels(target, ignore_index)
    opts = row_options(ignore_index, temperature)
    grads = head_backward(
        x, W, b, target, opts, stats, grad_logp, grad_entropy, chunk_rows, tuple(needs)
    )
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@_linear_token_log_probs_backward_op.register_fake
def _(x, W, b, *args):
    """(grad_x, grad_W, grad_b) of the real op's shapes, empty where not computed."""
    needs = args[-1]
    gx = x.new_empty(x.shape) if needs[0] else x.new_empty((0,))
    gw = W.new_empty(W.shape) if needs[1] else x.new_empty((0,))
    gb = b.new_empty(b.shape) if needs[2] and b is not None else x.new_empty((0,))
    return gx, gw, gb


def _ltlp_setup(ctx, inputs, output):
    x, W, b, target, ignore_index, temperature, entropy, chunk_rows, who = inputs
    ctx.has_bias = b is not None
    args = (ignore_index, temperature, chunk_rows)
    _save(ctx, (x, W, b, target, output[2]), args, entropy, who)


def _ltlp_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    g_h = _entropy_grad(ctx, grad_entropy)
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and ctx.has_bias
    gx, gw, gb = _linear_token_log_probs_backward_op(
        *ctx.saved_tensors, grad_logp, g_h, *ctx.args, needs
    )
    grads = tuple(g if need else None for g, need in zip((gx, gw, gb), needs, strict=True))
    return (*grads, None, None, None, None, None, None)


linear_token_log_probs_op.register_autograd(_ltlp_backward, setup_context=_ltlp_setup)
