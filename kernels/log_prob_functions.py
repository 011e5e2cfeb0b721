"""``token_log_probs`` and ``linear_token_log_probs``: per-token log-probabilities of the chosen
tokens, and the entropy, for RL trainers (GRPO / PPO / DPO build their losses from these).

With z = logits / T (or (input @ W.T + b) / T) and q = softmax(z) over the last dimension:
logp_i = log q_{i, y_i} and H_i = -sum_c q_ic log q_ic, float32 (float64 for float64 input), of
the target's shape; rows whose target is ``ignore_index`` give 0 and no gradient. Both outputs
are differentiable for any upstream gradient. The rows are ``log_prob_rows.py``; this file holds
the checks, the eager autograd Functions, the custom ops that ``torch.compile`` sees (fakes with
the real ops' contiguous strides) and the public functions. ``process_group`` goes to
``sharded.token_log_probs``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import func_transforms, index_check, log_prob_rows
from .index_check import check_class_indices
from .linear_chunks import planned_chunk_rows
from .log_prob_args import autocast_cast, check_flag, check_head, check_logits, check_temperature
from .log_prob_rows import head_backward, head_forward, row_options
from .options import accumulation_dtype, check_chunk_size, check_options, index_target_for_kernels
from .sharded import token_log_probs as sharded
from .stat_rows import EXTRA_STAT_ROWS, STAT_ROWS

__all__ = ["linear_token_log_probs", "token_log_probs"]

_WHO = "token_log_probs"
_LINEAR_WHO = "linear_token_log_probs"


def _no_double_backward(who: str) -> None:
    """Backward runs with grad mode on only under ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fusedce.{who}: double backward (create_graph=True) is not supported; compute "
            "log_softmax with torch ops for that term"
        )


def _flat_logits(logits: Tensor) -> Tensor:
    """(M, V) with unit stride along V: no copy for a contiguous input."""
    flat = logits.reshape(-1, logits.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _differentiable(
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


def _acc_empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=accumulation_dtype(like.dtype))


# --------------------------------------------------------------------------------------------
# Eager autograd: ungiven upstream gradients stay None (an entropy no gradient reaches costs
# nothing in backward)
# --------------------------------------------------------------------------------------------


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, ignore_index, entropy, who):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        opts = row_options(ignore_index, temperature)
        with index_check.reporting_as(who):  # the deferred check keeps the name
            fwd = log_prob_rows.forward_rows(logits, target, opts, entropy, defer_check=True)
        ctx.save_for_backward(logits, target, fwd.stats)
        ctx.opts, ctx.who, ctx.pending = opts, who, fwd.pending_check
        if entropy:
            return fwd.logp, fwd.entropy
        return fwd.logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        _no_double_backward(ctx.who)
        if ctx.pending is not None:
            ctx.pending.resolve()
        logits, target, stats = ctx.saved_tensors
        grad = log_prob_rows.grad_rows(logits, target, ctx.opts, stats, grad_logp, grad_entropy)
        return grad, None, None, None, None, None


class _LinearTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, target, temperature, ignore_index, entropy, chunk_rows, who):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        opts = row_options(ignore_index, temperature)
        stats = head_forward(x, W, b, target, opts, chunk_rows, entropy)
        logp, ent = log_prob_rows.outputs_from_stats(stats, target, ignore_index, entropy)
        ctx.save_for_backward(x, W, b, target, stats)
        ctx.opts, ctx.who, ctx.chunk_rows = opts, who, chunk_rows
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        _no_double_backward(ctx.who)
        x, W, b, target, stats = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        gx, gw, gb = head_backward(
            x, W, b, target, ctx.opts, stats, grad_logp, grad_entropy, ctx.chunk_rows, needs
        )
        return gx, gw, gb, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (every output contiguous, as the fakes)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedce::token_log_probs", mutates_args=())
def _token_log_probs_op(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    temperature: float,
    entropy: bool,
    who: str = _WHO,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp (M,), entropy (M,) or empty, row stats (STAT_ROWS or EXTRA_STAT_ROWS, M)) of (M, V)
    logits of any strides."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    target = index_target_for_kernels(target, ignore_index)
    opts = row_options(ignore_index, temperature)
    with index_check.reporting_as(who):
        fwd = log_prob_rows.forward_rows(logits, target, opts, entropy)
    ent = fwd.entropy if fwd.entropy is not None else _acc_empty(logits)
    return fwd.logp, ent, fwd.stats


@_token_log_probs_op.register_fake
def _(logits, target, ignore_index, temperature, entropy, who=_WHO):
    M, acc = logits.shape[0], accumulation_dtype(logits.dtype)
    rows = EXTRA_STAT_ROWS if entropy else STAT_ROWS
    ent = logits.new_empty((M,) if entropy else (0,), dtype=acc)
    return logits.new_empty((M,), dtype=acc), ent, logits.new_empty((rows, M), dtype=acc)


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
    return log_prob_rows.grad_rows(
        logits, target, opts, stats.contiguous(), grad_logp, grad_entropy
    )


@_token_log_probs_backward_op.register_fake
def _(logits, *_args, **_kwargs):
    return logits.new_empty(logits.shape)


def _tlp_setup(ctx, inputs, output):
    logits, target, ignore_index, temperature, entropy, who = inputs
    ctx.args = (ignore_index, temperature)
    ctx.entropy, ctx.who = entropy, who
    ctx.save_for_backward(logits, target, output[2])


def _tlp_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    _no_double_backward(ctx.who)
    logits, target, stats = ctx.saved_tensors
    g_h = grad_entropy if ctx.entropy else None
    grad = _token_log_probs_backward_op(logits, target, stats, grad_logp, g_h, *ctx.args)
    return grad, None, None, None, None, None


_token_log_probs_op.register_autograd(_tlp_backward, setup_context=_tlp_setup)


def _empty_grads(x: Tensor, W: Tensor, b: Tensor | None, needs: list[bool]):
    """(grad_x, grad_W, grad_b) of the backward op's shapes, empty where not computed."""
    gx = x.new_empty(x.shape) if needs[0] else x.new_empty((0,))
    gw = W.new_empty(W.shape) if needs[1] else x.new_empty((0,))
    gb = b.new_empty(b.shape) if needs[2] and b is not None else x.new_empty((0,))
    return gx, gw, gb


@torch.library.custom_op("fusedce::linear_token_log_probs", mutates_args=())
def _linear_token_log_probs_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    ignore_index: int,
    temperature: float,
    entropy: bool,
    chunk_rows: int,
    who: str = _LINEAR_WHO,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp (N,), entropy (N,) or empty, row stats) of the head x @ W.T + b, chunked."""
    check_class_indices(target, W.shape[0], ignore_index, who)
    x = x.contiguous()
    target = index_target_for_kernels(target, ignore_index)
    opts = row_options(ignore_index, temperature)
    stats = head_forward(x, W, b, target, opts, chunk_rows, entropy)
    logp, ent = log_prob_rows.outputs_from_stats(stats, target, ignore_index, entropy)
    return logp, ent if ent is not None else _acc_empty(x), stats


@_linear_token_log_probs_op.register_fake
def _(x, W, b, target, ignore_index, temperature, entropy, chunk_rows, who=_LINEAR_WHO):
    N, acc = x.shape[0], accumulation_dtype(x.dtype)
    rows = EXTRA_STAT_ROWS if entropy else STAT_ROWS
    ent = x.new_empty((N,) if entropy else (0,), dtype=acc)
    return x.new_empty((N,), dtype=acc), ent, x.new_empty((rows, N), dtype=acc)


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
def _(
    x, W, b, target, stats, grad_logp, grad_entropy, ignore_index, temperature, chunk_rows, needs
):
    return _empty_grads(x, W, b, needs)


def _ltlp_setup(ctx, inputs, output):
    x, W, b, target, ignore_index, temperature, entropy, chunk_rows, who = inputs
    ctx.args = (ignore_index, temperature, chunk_rows)
    ctx.entropy, ctx.who, ctx.has_bias = entropy, who, b is not None
    ctx.save_for_backward(x, W, b, target, output[2])


def _ltlp_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    _no_double_backward(ctx.who)
    x, W, b, target, stats = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and ctx.has_bias
    g_h = grad_entropy if ctx.entropy else None
    gx, gw, gb = _linear_token_log_probs_backward_op(
        x, W, b, target, stats, grad_logp, g_h, *ctx.args, needs
    )
    grads = tuple(g if need else None for g, need in zip((gx, gw, gb), needs, strict=True))
    return (*grads, None, None, None, None, None, None)


_linear_token_log_probs_op.register_autograd(_ltlp_backward, setup_context=_ltlp_setup)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _wants_group(process_group: object) -> bool:
    """A group was given (``group.WORLD`` before ``init_process_group`` is None: no group)."""
    return process_group is not None


def token_log_probs(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    process_group: object = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probabilities log softmax(logits / T)[target] (and the entropy), fused.

    One pass over the logits forward (the cross-entropy's row kernel: nothing of size (..., V)
    is written), one backward; half-precision logits are read as they are.

    Args:
        logits: (..., V) logits, class dimension last; float32, float16, bfloat16 (float64
            takes the torch backend); any strides.
        target: (...) class indices (int64, int32 or uint8).
        temperature: T > 0; the distribution is softmax(logits / T).
        ignore_index: target value whose row gives 0 for both outputs and no gradient.
        return_entropy: also return H = -sum_c q_c log q_c per row.
        process_group: a ``torch.distributed.ProcessGroup`` over which the class dimension is
            split in contiguous slices in rank order: ``logits`` is this rank's slice (..., V_r)
            and ``target`` holds global class indices, the same on every rank. Every rank gets
            the same result; O(N) numbers per rank are exchanged, never the logits. None: the
            unsharded function.

    Returns:
        ``logp`` of the target's shape, float32 (float64 for float64 logits); with
        ``return_entropy`` the tuple ``(logp, entropy)``. Both are differentiable: the
        gradient of a row is (g_lp * (onehot(y) - q) + g_H * q * (-log q - H)) / T.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices or options; every message starts
            with ``token_log_probs``. IndexError: a class index outside [0, V) other than
            ``ignore_index`` (see ``fusedce.set_target_check``; on CUDA raised from backward
            where a gradient is wanted). RuntimeError: double backward.
    """
    return _token_log_probs(
        _WHO, logits, target, temperature, ignore_index, return_entropy, process_group
    )


def _token_log_probs(
    who: str,
    logits: Tensor,
    target: Tensor,
    temperature: object,
    ignore_index: object,
    return_entropy: object,
    process_group: object = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_log_probs`` for the public function ``who`` (a group of one rank comes back
    here from the sharded path)."""
    if _wants_group(process_group):
        if func_transforms.active():
            raise func_transforms.refuse_sharded(who)
        return sharded.call_token_log_probs(
            who,
            logits,
            target,
            temperature,
            ignore_index,
            return_entropy,
            process_group,
            plain=_token_log_probs,
        )
    T = check_temperature(who, temperature)
    ii = check_options(who, ignore_index, 0.0, "none").ignore_index
    entropy = check_flag(who, "return_entropy", return_entropy)
    check_logits(who, logits, target)
    out_shape = tuple(target.shape)
    x = _flat_logits(logits)
    t = index_target_for_kernels(target.reshape(-1), ii)
    if func_transforms.active():
        logp, ent = _differentiable(x, t, T, ii, entropy)
    elif torch.compiler.is_compiling():
        logp, ent, _ = _token_log_probs_op(x, t, ii, T, entropy, who)
    elif torch.is_grad_enabled() and logits.requires_grad:
        out = _TokenLogProbs.apply(x, t, T, ii, entropy, who)
        logp, ent = out if entropy else (out, None)
    else:
        with index_check.reporting_as(who):
            fwd = log_prob_rows.forward_rows(x, t, row_options(ii, T), entropy)
        logp, ent = fwd.logp, fwd.entropy
    if not entropy:
        return logp.reshape(out_shape)
    return logp.reshape(out_shape), ent.reshape(out_shape)


def linear_token_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    process_group: object = None,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_log_probs(F.linear(input, linear_weight, linear_bias), target, ...)`` without
    ever materialising the (N, V) logits.

    Forward walks the token rows in chunks of at most ``chunk_size`` rows of logits and keeps a
    few numbers per row; backward recomputes each chunk's logits (the upstream gradients are
    known only then) and writes its gradient over them before the three products.

    Args:
        input: (..., D) hidden states; float32, float16, bfloat16 or float64.
        linear_weight: (V, D) output projection (under ``process_group``: this rank's (V_r, D)
            rows, a contiguous slice of the vocabulary in rank order), the input's dtype.
        target: (...) class indices (global ones under ``process_group``).
        linear_bias: (V,) (or this rank's (V_r,)) or None.
        temperature, ignore_index: as ``token_log_probs``.
        return_entropy: also return the entropy (the default here: RL losses usually log or
            regularise it).
        process_group: as ``token_log_probs``; the input gradient is all-reduced inside, so
            every rank gets the gradient of the whole head.
        chunk_size: token rows per chunk; None picks about 256 MiB of logits (32 MiB on the
            CPU).

    Returns:
        ``(logp, entropy)`` of the target's shape (float32; float64 for float64 input), or
        ``logp`` alone with ``return_entropy=False``. Gradients reach ``input``,
        ``linear_weight`` and ``linear_bias`` (float32 sums for half-precision weights).

    Raises:
        TypeError, ValueError, IndexError, RuntimeError: as ``token_log_probs``; messages
            start with ``linear_token_log_probs``.
    """
    return _linear_token_log_probs(
        _LINEAR_WHO,
        input,
        linear_weight,
        target,
        linear_bias,
        temperature,
        ignore_index,
        return_entropy,
        chunk_size,
        process_group,
    )


def _linear_token_log_probs(
    who: str,
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    temperature: object,
    ignore_index: object,
    return_entropy: object,
    chunk_size: object,
    process_group: object = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``linear_token_log_probs`` for the public function ``who``."""
    input, linear_weight, linear_bias = autocast_cast(input, linear_weight, linear_bias)
    if _wants_group(process_group):
        if func_transforms.active():
            raise func_transforms.refuse_sharded(who)
        return sharded.call_linear_token_log_probs(
            who,
            input,
            linear_weight,
            target,
            linear_bias,
            temperature,
            ignore_index,
            return_entropy,
            chunk_size,
            process_group,
            plain=_linear_token_log_probs,
        )
    T = check_temperature(who, temperature)
    ii = check_options(who, ignore_index, 0.0, "none").ignore_index
    entropy = check_flag(who, "return_entropy", return_entropy)
    check_chunk_size(who, chunk_size)
    check_head(who, input, linear_weight, target, linear_bias)
    V, D = linear_weight.shape
    out_shape = tuple(target.shape)
    x = input.reshape(-1, D).contiguous()
    t = index_target_for_kernels(target.reshape(-1), ii)
    rows = planned_chunk_rows(x.shape[0], V, x.dtype, chunk_size, x.device)
    params = (input, linear_weight, linear_bias)
    need_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if func_transforms.active():
        # Under a transform the logits are materialised: the chunked Functions cannot run there.
        logits = torch.nn.functional.linear(x, linear_weight, linear_bias)
        logp, ent = _differentiable(logits, t, T, ii, entropy)
    elif torch.compiler.is_compiling():
        logp, ent, _ = _linear_token_log_probs_op(
            x, linear_weight, linear_bias, t, ii, T, entropy, rows, who
        )
    else:
        check_class_indices(t, V, ii, who)
        if need_grad:
            out = _LinearTokenLogProbs.apply(
                x, linear_weight, linear_bias, t, T, ii, entropy, rows, who
            )
            logp, ent = out if entropy else (out, None)
        else:
            opts = row_options(ii, T)
            stats = head_forward(x, linear_weight, linear_bias, t, opts, rows, entropy)
            logp, ent = log_prob_rows.outputs_from_stats(stats, t, ii, entropy)
    if not entropy:
        return logp.reshape(out_shape)
    return logp.reshape(out_shape), ent.reshape(out_shape)
