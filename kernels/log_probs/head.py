"""The fused head of ``linear_token_log_probs``: the rows of ``rows`` on chunks of x @ W.T (+ b),
never all N x V logits.

Forward computes the row statistics chunk by chunk (``head_forward``: ``linear_chunks``' loop,
``chunk_sweep``, without gradients); backward recomputes each chunk's logits (``head_backward``):
the upstream gradients are known only then, and the alternative, keeping N x V gradients, is
what the head exists to avoid. The input gradient alone could be formed in forward (g_lp *
(A @ W) is linear in the row factor) but the weight gradient cannot, so the recompute (one GEMM
more than the mean cross-entropy's three) is needed anyway. Both passes form each chunk's logits
with the same product, so that the saved statistics describe the recomputed logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import core
from ..linear_chunks import chunk_sweep
from ..options import LossOptions, index_target_for_kernels
from .checks import HeadCall
from .rows import grad_rows, outputs_from_stats, rows_stats


def head_rows(call: HeadCall, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(N, D) contiguous hidden states and (N,) class indices as the kernels read them, of the
    call's (..., D) ``input`` and (...) ``target``."""
    x = call.input.reshape(-1, call.input.shape[-1]).contiguous()
    return x, index_target_for_kernels(call.target.reshape(-1), ignore_index)


def autocast_cast(call: HeadCall) -> HeadCall:
    """Under autocast, the head's operands in the autocast dtype, as ``F.linear`` would run."""
    input = call.input
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled(input.device.type):
        return call
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t: object) -> object:
        ok = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if ok else t

    return call._replace(
        input=cast(input),
        linear_weight=cast(call.linear_weight),
        linear_bias=cast(call.linear_bias),
    )


def head_forward(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    opts: LossOptions,
    chunk_rows: int,
    entropy: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(logp (N,), entropy (N,) or None, (4, N) or (7, N) row statistics) of the head's logits,
    chunk by chunk (``rows_stats`` on each chunk of x @ W.T + b; the class indices are checked
    by the caller, once).

    Args:
        x: (N, D) contiguous. W: (V, D). b: (V,) or None. target: (N,) class indices.
        opts: ``rows.row_options``. chunk_rows: token rows per chunk. entropy: fill the entropy
            row.
    """
    stats = core.new_stats(x.shape[0], x.dtype, x.device, entropy)

    def visit(rows: slice, logits: Tensor) -> None:
        rows_stats(logits, target[rows], opts, entropy, stats[:, rows])

    chunk_sweep(x, W, b, chunk_rows, visit, (False, False, False))
    logp, ent = outputs_from_stats(stats, target, opts.ignore_index, entropy)
    return logp, ent, stats


def head_backward(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    opts: LossOptions,
    stats: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    chunk_rows: int,
    needs: tuple[bool, bool, bool],
    col_offset: int = 0,
    vocab: int | None = None,
    own_stats: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_x (N, D), grad_W (V, D), grad_b (V,)), each None where ``needs`` says no: each
    chunk's logits recomputed, its gradient written over them in place (``grad_rows``), then
    the three products. grad_W and grad_b accumulate in float32 for half-precision weights.

    Args: as ``head_forward``; ``stats`` from it (or the combined statistics of a vocabulary
    slice, with ``col_offset``, ``vocab`` and ``own_stats`` as in ``rows.grad_rows``);
    ``grad_logp`` / ``grad_entropy`` (N,) or None.
    """

    def visit(rows: slice, logits: Tensor) -> None:
        grad_rows(
            logits,
            target[rows],
            opts,
            stats[:, rows],
            grad_logp[rows] if grad_logp is not None else None,
            grad_entropy[rows] if grad_entropy is not None else None,
            out=logits,
            col_offset=col_offset,
            vocab=vocab,
            own_stats=own_stats,
        )

    return chunk_sweep(x, W, b, chunk_rows, visit, needs)
