"""The public functions ``token_log_probs`` and ``linear_token_log_probs``: per-token
log-probabilities of the chosen tokens, and the entropy, for RL trainers (GRPO / PPO / DPO build
their losses from these).

With z = logits / T (or (input @ W.T + b) / T) and q = softmax(z) over the last dimension:
logp_i = log q_{i, y_i} and H_i = -sum_c q_c log q_c, float32 (float64 for float64 input), of
the target's shape; rows whose target is ``ignore_index`` give 0 and no gradient. Both outputs
are differentiable for any upstream gradient. Each call checks its arguments (``checks``) and
takes one of four paths: the differentiable torch ops under a ``torch.func`` transform
(``functions.differentiable``), the custom ops while ``torch.compile`` traces (``custom_ops``),
the autograd Functions where a gradient is wanted (``functions``), the rows alone otherwise
(``rows``, ``head``). ``process_group`` goes to ``sharded.token_log_probs``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import func_transforms, index_check
from ..index_check import check_class_indices
from ..linear_chunks import planned_chunk_rows
from ..sharded import token_log_probs as sharded
from .checks import HeadCall, LogitsCall, check_head, check_log_prob_options, check_logits
from .custom_ops import LINEAR_WHO, WHO, linear_token_log_probs_op, token_log_probs_op
from .functions import LinearTokenLogProbs, TokenLogProbs, differentiable
from .head import autocast_cast, head_forward, head_rows
from .rows import flat_rows, forward_rows, row_options, shaped

__all__ = ["linear_token_log_probs", "token_log_probs"]


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
            takes the torch backend); any strides. A ``DTensor`` sharded on the class dimension
            (``Shard(-1)``) of a 1-D device mesh runs as ``process_group`` over the mesh's
            group on the local slices (``target`` plain or replicated), and both outputs come
            back as replicated DTensors.
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
    call = LogitsCall(logits, target, temperature, ignore_index, return_entropy)
    return _call(WHO, call, process_group)


def _call(
    who: str, call: LogitsCall | HeadCall, process_group: object = None
) -> Tensor | tuple[Tensor, Tensor]:
    """The public function ``who`` on its arguments ``call``: over ``process_group`` where one
    is given (a group of one rank comes back here without it), else on this process."""
    if isinstance(call, HeadCall):
        call = autocast_cast(call)  # the autocast dtype is the operands' (a no-op the 2nd time)
    if sharded.wants_sharded(call, process_group):
        if func_transforms.active():
            raise func_transforms.refuse_sharded(who)
        return sharded.call_sharded(who, call, process_group, plain=_call)
    if isinstance(call, HeadCall):
        return _linear_token_log_probs(who, call)
    return _token_log_probs(who, call)


def _token_log_probs(who: str, call: LogitsCall) -> Tensor | tuple[Tensor, Tensor]:
    """``token_log_probs`` on this process: its checks, then one of the four paths."""
    T, ii, entropy = check_log_prob_options(who, call)
    check_logits(who, call)
    x, t = flat_rows(call.logits, call.target, ii)
    if func_transforms.active():
        logp, ent = differentiable(x, t, T, ii, entropy)
    elif torch.compiler.is_compiling():
        logp, ent, _ = token_log_probs_op(x, t, ii, T, entropy, who)
    elif torch.is_grad_enabled() and call.logits.requires_grad:
        out = TokenLogProbs.apply(x, t, T, ii, entropy, who)
        logp, ent = out if entropy else (out, None)
    else:
        with index_check.reporting_as(who):
            fwd = forward_rows(x, t, row_options(ii, T), entropy)
        logp, ent = fwd.logp, fwd.entropy
    return shaped(logp, ent, entropy, tuple(call.target.shape))


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
            rows, a contiguous slice of the vocabulary in rank order), the input's dtype; or a
            ``DTensor`` sharded by rows (``Shard(0)``) on a 1-D device mesh, as a DTensor
            ``logits`` in ``token_log_probs``.
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
    call = HeadCall(
        input,
        linear_weight,
        target,
        linear_bias,
        temperature,
        ignore_index,
        return_entropy,
        chunk_size,
    )
    return _call(LINEAR_WHO, call, process_group)


def _linear_token_log_probs(who: str, call: HeadCall) -> Tensor | tuple[Tensor, Tensor]:
    """``linear_token_log_probs`` on this process (autocast applied): its checks, then one of
    the four paths."""
    T, ii, entropy = check_log_prob_options(who, call)
    check_head(who, call)
    W, b = call.linear_weight, call.linear_bias
    V = W.shape[0]
    x, t = head_rows(call, ii)
    rows = planned_chunk_rows(x.shape[0], V, x.dtype, call.chunk_size, x.device)
    params = (call.input, W, b)
    need_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if func_transforms.active():
        # Under a transform the logits are materialised: the chunked Functions cannot run there.
        logp, ent = differentiable(torch.nn.functional.linear(x, W, b), t, T, ii, entropy)
    elif torch.compiler.is_compiling():
        logp, ent, _ = linear_token_log_probs_op(x, W, b, t, ii, T, entropy, rows, who)
    else:
        check_class_indices(t, V, ii, who)
        if need_grad:
            out = LinearTokenLogProbs.apply(x, W, b, t, T, ii, entropy, rows, who)
            logp, ent = out if entropy else (out, None)
        else:
            logp, ent, _ = head_forward(x, W, b, t, row_options(ii, T), rows, entropy)
    return shaped(logp, ent, entropy, tuple(call.target.shape))
