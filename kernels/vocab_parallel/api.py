"""The entry points of the vocabulary-parallel losses: ``vocab_parallel_cross_entropy`` and
``vocab_parallel_linear_cross_entropy``, and ``call_cross_entropy`` /
``call_linear_cross_entropy`` (the same, for a caller that names the function in the errors).

They sit above both implementations: the sharded path (``fusedce.sharded``) and, for a group of
one rank or no group, the plain functions (``fusedce.cross_entropy_loss`` /
``fusedce.linear_cross_entropy_loss``), which they hand to the sharded path as a callable.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor

from ..core import CrossEntropyStats
from ..cross_entropy_loss import named_cross_entropy
from ..linear_cross_entropy_loss import named_linear_cross_entropy
from ..options import CallOptions
from ..sharded import route
from ..sharded.arguments import CE_WHO, LCE_WHO


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy of logits split by class over the ranks of ``process_group``.

    Rank r holds the logits of the classes [start_r, start_r + V_r): contiguous ranges in rank
    order, any sizes. The result is the same on every rank and equals
    ``fusedce.cross_entropy`` of the concatenated logits (with the same options); each rank's
    gradient is its slice of that function's gradient.

    Reductions done here (do not all-reduce again): forward all-reduces (MAX) the (M,) row maxima
    (float64 (2, M) with the argmax key of probability targets when ``return_stats``) and then
    (SUM) one stacked (k, M) buffer: k = 2 ((3 for probabilities), + 3 with ``return_stats``);
    backward communicates nothing: each rank gets exactly its slice of the gradient. One
    all_gather of a few int64 per rank comes first (see Raises), unless ``vocab_start`` /
    ``vocab_size`` are given and the checks are off (``set_target_check(False)``). Under
    ``torch.compile`` the call runs eagerly (a graph break).

    Args:
        local_logits: this rank's logits: (C_r,), (N, C_r) or (N, C_r, d1, ..., dk); float32,
            float16, bfloat16 or float64. Or a ``DTensor`` sharded on the class dimension
            (``Shard(1)``, or ``Shard(-1)`` for 2-D) of a 1-D mesh: its mesh's group is used and
            the loss is returned as a replicated DTensor (as ``loss_parallel()`` does).
        target: GLOBAL class indices (int64, int32 or uint8) of shape (), (N,) or
            (N, d1, ..., dk), the same on every rank; or this rank's slice of the class
            probabilities, of the shape of ``local_logits`` (may require grad).
        weight: optional FULL (V,) class weights, the same on every rank (their values are in
            the ranks' fingerprint).
        ignore_index: class index that contributes neither loss nor gradient.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        label_smoothing: amount in [0, 1] of uniform smoothing over all V classes.
        logit_scale: s > 0; the loss sees z = s * x.
        softcap: c > 0 or None; then z = c * tanh(z / c), after the scale.
        z_loss: lambda >= 0; each non-ignored element adds lambda * lse(z)**2 (lse over all V).
        token_weight: optional float tensor of the per-element loss shape, finite and >= 0,
            the same on every rank (replicated), not differentiated: element i contributes
            t_i * (l_i + lambda * lse_i**2); "mean" divides by sum_i t_i * w_{y_i}.
        return_stats: also return ``CrossEntropyStats`` (z-loss part, lse, entropy, correct)
            of the full vocabulary, identical on every rank (``correct``: the first maximum
            over all V classes, as ``torch.argmax``; for probability targets the target's
            argmax compares the probabilities rounded to float32).
        process_group: the ``torch.distributed.ProcessGroup`` the vocabulary is split over;
            None: the default group when ``torch.distributed`` is initialised, else the plain
            function (``torch.distributed.group.WORLD`` is None before
            ``init_process_group``, so it means the same). A group of size 1 is the plain
            ``fusedce.cross_entropy``.
        vocab_start: first global class of this rank's slice (with ``vocab_size``). The
            exchange checks it: rank r must start at the sum of the earlier ranks' widths. With
            the checks off (``set_target_check(False)``) it is trusted and replaces the
            exchange: nothing is read back to the host.
        vocab_size: V, the global number of classes: the sum of the widths.

    Returns:
        The loss, float32 (float64 for float64 logits): a scalar, or the target's shape for
        reduction="none"; identical on every rank. With ``return_stats`` the tuple
        ``(loss, stats)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes or options; ranks that disagree on the number
            of rows, the target, the token weights, the class weights, the options or the
            dtype; a weight that is not (V,); a ``vocab_start`` / ``vocab_size`` that does not
            match the slice sizes; a ``process_group`` that is not a ProcessGroup (TypeError) or
            does not hold this rank.
        RuntimeError: a ``process_group`` while ``torch.distributed`` is not initialised.
        IndexError: a class index outside [0, V) other than ignore_index.
        Every rank raises the same exception, also when only one rank's arguments are bad, and
        none is left waiting in a collective (the ``process_group`` checks come before any
        collective and raise where the group is bad). With ``vocab_start`` / ``vocab_size``
        given and the checks off there is no exchange: each rank checks only its own
        arguments, and a rank-specific error raises on that rank alone while the others wait
        until the group's timeout.
    """
    call = CallOptions.of_keywords(locals())
    tensors = (local_logits, target, weight, token_weight)
    return call_cross_entropy(CE_WHO, tensors, call, process_group, vocab_start, vocab_size)


# ``vocab_parallel_cross_entropy`` called through the public function ``who`` (its first
# argument, which the errors name), its tensors in a tuple: ``route.call_sharded`` with the
# plain implementation.
call_cross_entropy = partial(route.call_sharded, route.CE, plain=named_cross_entropy)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``cross_entropy(linear(input, W, b), target)`` with W split by rows over the ranks.

    Rank r holds the rows [start_r, start_r + V_r) of the (V, D) output weight (contiguous
    ranges in rank order, any sizes) and of the bias; ``input`` is replicated. The loss is the
    same on every rank and equals ``fusedce.linear_cross_entropy`` with the full weight (and
    the same options). The (N, V_r) logits are never materialised: at most ``chunk_size`` rows
    at a time.

    Reductions done here (do not all-reduce again): forward all-reduces (MAX) the (N,) row maxima
    and then (SUM) one stacked (2, N) buffer ((5, N)
    with ``return_stats``); backward all-reduces (SUM) the (N, D) input gradient in float32, so
    ``input.grad`` is the FULL gradient on every rank (``input`` must then require grad on every
    rank or on none). The gradients of ``local_weight`` and ``linear_bias`` are this rank's slices
    and are not reduced. One all_gather of a few int64 per rank comes first, unless
    ``vocab_start`` / ``vocab_size`` are given and the checks are off. Under ``torch.compile``
    the call runs eagerly (a graph break).

    Args:
        input: (D,), (N, D) or (..., D) hidden states, the same on every rank; float32,
            float16, bfloat16 or float64.
        local_weight: (V_r, D) this rank's rows of the output weight; input's dtype. Or a
            ``DTensor`` (V, D) sharded ``Shard(0)`` on a 1-D mesh: its mesh's group is used
            and the loss (and stats) come back as replicated DTensors.
        target: GLOBAL class indices (int64, int32 or uint8) of shape ``input.shape[:-1]``,
            the same on every rank.
        linear_bias: optional (V_r,) this rank's slice of the bias; input's dtype.
        weight: optional FULL (V,) class weights.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        ignore_index: class index that contributes neither loss nor gradient (None: -100).
        label_smoothing: amount in [0, 1] of uniform smoothing over all V classes.
        chunk_size: token rows per chunk; None picks the plain function's default for V_r.
        logit_scale, softcap, z_loss, token_weight, return_stats: as in
            :func:`vocab_parallel_cross_entropy` (``token_weight`` of the target's shape).
        process_group: as in :func:`vocab_parallel_cross_entropy`; a group of size 1 is the
            plain ``fusedce.linear_cross_entropy``.
        vocab_start: first global class of this rank's rows (with ``vocab_size``), checked as
            in :func:`vocab_parallel_cross_entropy` (trusted with the checks off: then no
            all_gather).
        vocab_size: V, the global number of classes.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or ``input.shape[:-1]`` for
        reduction="none"; identical on every rank. With ``return_stats`` the tuple
        ``(loss, stats)``.

    Raises:
        As :func:`vocab_parallel_cross_entropy` (the ranks also agree on D);
        NotImplementedError: probability targets.
    """
    call = CallOptions.of_keywords(locals())
    head = (input, local_weight, target, linear_bias, weight, token_weight)
    return call_linear_cross_entropy(LCE_WHO, head, call, process_group, vocab_start, vocab_size)


# ``vocab_parallel_linear_cross_entropy`` called through the public function ``who``.
call_linear_cross_entropy = partial(route.call_sharded, route.LCE, plain=named_linear_cross_entropy)
