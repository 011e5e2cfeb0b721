"""``linear_cross_entropy`` and ``LinearCrossEntropyLoss``: the fused linear head.

``linear_cross_entropy(input, W, target)`` equals
``F.cross_entropy(F.linear(input, W, b), target)`` (the signature and semantics of PyTorch
2.13's ``torch.nn.functional.linear_cross_entropy``) but never materialises the full (N, V)
logits: ``linear_chunks.py`` walks the token rows in chunks. This file holds the functional API
and the module; the checks are ``validation.py``, the autograd Function
``autograd_functions.py``, the custom ops ``custom_ops.py``.

With a scalar reduction the mean normaliser over ALL targets is computed first, so each chunk's
gradient is final up to ``grad_output``; backward only scales the three saved gradients. With
``reduction="none"`` (one upstream gradient per token) forward computes only the loss and
backward recomputes the chunks with the per-row factors folded into the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import core, func_transforms
from .autograd_functions import LinearCrossEntropy, Plan, mean_gradient_scale, run_chunks
from .core import CrossEntropyStats
from .custom_ops import float_options_as_tensor
from .custom_ops import linear_cross_entropy_op as _lce_op
from .index_check import check_class_indices
from .linear_chunks import Accumulation, planned_chunk_rows
from .options import (
    CallOptions,
    index_target_for_kernels,
    prepare_class_weight,
    prepare_token_weight,
    to_op_args,
)
from .sharded import route as sharded
from .validation import check_linear_args, check_token_weight

__all__ = ["LinearCrossEntropyLoss", "linear_cross_entropy"]

_WHO = "linear_cross_entropy"
# The options ``LinearCrossEntropyLoss`` holds as attributes (``CallOptions.hold``; read
# back by ``CallOptions.of``), in the order of its repr.
_MODULE_OPTIONS = ("reduction", "ignore_index", "label_smoothing", "chunk_size", "accumulation")
_MODULE_OPTIONS += ("logit_scale", "softcap", "z_loss", "return_stats")


def _autocast_cast(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under autocast, run the GEMMs in the autocast dtype as F.linear would."""
    if not isinstance(input, Tensor):  # the checks that follow name the bad argument
        return input, linear_weight, linear_bias
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if t is None or t.dtype == torch.float64 else t.to(dtype)
    return cast(input), cast(linear_weight), cast(linear_bias)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    accumulation: Accumulation = "float32",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target)``, chunked and fused.

    The (N, V) logits are never materialised: at most ``chunk_size`` rows of logits exist at a
    time, and the gradient of each chunk overwrites its logits in place (see the module doc).

    Args:
        input: (D,), (N, D) or (..., D) hidden states, e.g. (B, T, D) from an LM; float32,
            float16, bfloat16 (or float64, computed in float64 by the torch fallback).
        linear_weight: (V, D) weight of the projection, e.g. ``lm_head.weight``; input's dtype.
        target: class indices (int64 or int32) of shape ``input.shape[:-1]``.
        linear_bias: optional (V,) bias of the projection, input's dtype.
        weight: optional (V,) class weights.
        reduction: "none" (loss of the target's shape), "mean" or "sum".
        ignore_index: class index that contributes neither loss nor gradient (None: -100).
        label_smoothing: amount in [0, 1] of uniform smoothing of the target distribution.
        chunk_size: token rows per chunk; None picks ``planned_chunk_rows`` (about 256 MiB of
            logits on GPU, 32 MiB on CPU). Need not divide N. Peak extra memory is about
            ``chunk_size * V * element_size`` plus the gradients.
        accumulation: "float32" (default) accumulates the half-precision weight gradient across
            chunks in a float32 (V, D) buffer, cast once at the end: as accurate as one GEMM
            over all tokens (on the CPU each chunk's bfloat16 product is rounded once first:
            within ~1.2x of that). "input" accumulates straight into the weight's dtype (rounded
            once per chunk) and saves those V * D * 4 bytes. No effect for float32 weights.
        logit_scale: s > 0; the loss sees z = s * logits.
        softcap: c > 0 or None; then z = c * tanh(z / c), after the scale.
        z_loss: lambda >= 0; each non-ignored token adds lambda * logsumexp(z)**2.
        token_weight: optional float tensor of the target's shape, finite and >= 0, not
            differentiated: token i contributes t_i * (l_i + lambda * lse_i**2); "mean" divides
            by sum_i t_i * w_{y_i} over the non-ignored tokens.
        return_stats: also return a ``CrossEntropyStats`` (z_loss part, lse, entropy,
            correct) from the chunks the loop computes anyway.
        process_group: a ``torch.distributed.ProcessGroup`` over which the vocabulary is split:
            ``linear_weight`` (and ``linear_bias``) are then this rank's rows, ``input`` is
            replicated and ``target`` holds global class indices; the input's gradient comes
            back all-reduced. See ``fusedce.vocab_parallel.vocab_parallel_linear_cross_entropy``
            (also taken for a ``DTensor`` linear_weight sharded by rows, without a group).
            None (the default) is the unsharded loss; so is ``torch.distributed.group.WORLD``
            before ``init_process_group``, which is None then.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or ``input.shape[:-1]`` for
        reduction="none"; with ``return_stats`` the tuple ``(loss, stats)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or options; a ``process_group``
            that is not a ProcessGroup. Every message starts with the name of the function
            called (``linear_cross_entropy``, or ``LinearCrossEntropyLoss`` for the module).
        IndexError: a class index outside [0, V) other than ignore_index.
        RuntimeError: a ``process_group`` while ``torch.distributed`` is not initialised.
        NotImplementedError: probability targets, K-dimensional linear_weight.

    Deviations from torch: the loss is float32 for half-precision input (as
    ``kernels.cross_entropy``); reduction="mean" over nothing (every target ignored, or no rows)
    gives 0 and zero gradients instead of NaN; any input shape (..., D) is accepted. As with
    torch's chunked path, backward twice through the same graph (retain_graph=True) raises for
    the scalar reductions, and higher-order gradients are not supported.
    """
    call = CallOptions.of_keywords(locals())
    head = (input, linear_weight, target, linear_bias, weight, token_weight)
    return named_linear_cross_entropy(_WHO, head, call, process_group)


def named_linear_cross_entropy(
    who: str, head: tuple, call: CallOptions, process_group: object = None
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``linear_cross_entropy`` of ``head`` (input, linear_weight, target, linear_bias, weight,
    token_weight) for the public function ``who`` (``linear_cross_entropy``,
    ``LinearCrossEntropyLoss``, or the vocabulary-parallel head on one rank): every error
    names it."""
    compiling = torch.compiler.is_compiling()
    input, linear_weight, target, linear_bias, weight, token_weight = head
    # Cast before any check: under autocast, F.linear would accept a float32 weight with a
    # bfloat16 input (both run in the autocast dtype), so the fused head must too.
    input, linear_weight, linear_bias = _autocast_cast(input, linear_weight, linear_bias)
    if sharded.wants_vocab_parallel(linear_weight, process_group):
        if func_transforms.active():
            raise func_transforms.refuse_sharded(who)
        sharded.refuse_unsharded_options(who, accumulation=call.accumulation)
        head = (input, linear_weight, target, linear_bias, weight, token_weight)
        return sharded.call_sharded(
            sharded.LCE, who, head, call, process_group, plain=named_linear_cross_entropy
        )
    opts, chunk_size, accumulation = call.head_options(who), call.chunk_size, call.accumulation
    check_linear_args(who, input, linear_weight, target, linear_bias, weight)
    check_token_weight(who, token_weight, tuple(target.shape), input.device)
    V, D = linear_weight.shape
    out_shape = tuple(target.shape)
    x = input.reshape(-1, D).contiguous()
    t = index_target_for_kernels(target.reshape(-1), opts.ignore_index)
    weight = prepare_class_weight(weight, x.dtype)
    tw = prepare_token_weight(token_weight, x.dtype)
    extras = bool(call.return_stats)
    if func_transforms.active():
        # torch.func.grad / vmap / jacrev ...: differentiable torch ops, same semantics.
        logits = F.linear(x, linear_weight, linear_bias)  # (N, V), as each chunk's dtype
        return func_transforms.cross_entropy(logits, t, weight, opts, tw, out_shape, extras, who)
    if not compiling:  # the custom op checks inside, opaque to dynamo
        check_class_indices(t, V, opts.ignore_index, who)
    rows = planned_chunk_rows(x.shape[0], V, x.dtype, chunk_size, x.device)
    plan = Plan(opts, rows, accumulation, extras, who)
    params = (input, linear_weight, linear_bias)
    need_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if compiling:
        needs = [need_grad and p is not None and p.requires_grad for p in params]
        # On the CPU the float options travel in a tensor: one graph for every value of a float
        # that changes between calls.
        op_args = to_op_args(opts, float_options_as_tensor(x, opts, False))
        head = (x, linear_weight, linear_bias, t, weight)
        rest = {"chunk_rows": rows, "accumulation": accumulation, "needs": needs}
        rest.update(token_weight=tw, extras=extras, who=who)
        loss, *_, stats = _lce_op(*head, **rest, **op_args)
        scale = None
    elif need_grad:
        loss, stats, scale = LinearCrossEntropy.apply(
            x, linear_weight, linear_bias, t, weight, plan, tw
        )
    else:
        scale = mean_gradient_scale(t, weight, opts, x, tw)
        head = (x, linear_weight, linear_bias, t, weight)
        stats, *_ = run_chunks(*head, plan, None, (False,) * 3, tw)
        loss = core.reduce_rows(stats[core.LOSS], scale, opts)
    loss = loss.reshape(out_shape) if opts.per_row else loss
    if not extras:
        return loss
    if scale is None and opts.mean:
        scale = mean_gradient_scale(t, weight, opts, x, tw)
    return loss, core.public_stats(stats, scale, opts, out_shape)


class LinearCrossEntropyLoss(nn.Module):
    """``torch.nn.LinearCrossEntropyLoss`` on the chunked fused path; see linear_cross_entropy.

    Like torch's module it owns the projection (``self.linear``, an ``nn.Linear(in_features,
    num_classes)``) and ``forward(input, target)`` returns the loss of ``self.linear(input)``.
    To put it on an existing LM head, use :meth:`from_linear`, which shares that module.

    Shapes: input (D,), (N, D) or (..., D); target ``input.shape[:-1]`` class indices; output a
    scalar, or the target's shape for reduction="none".
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        accumulation: Accumulation = "float32",
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        CallOptions.hold(self, locals(), _MODULE_OPTIONS)
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> LinearCrossEntropyLoss:
        """A loss module sharing an existing projection (e.g. ``model.lm_head``), not copying it.

        Args:
            linear: the ``nn.Linear(D, V)`` whose weight (and bias) produce the logits.
            **kwargs: the keyword options of ``__init__`` (reduction, weight, ignore_index, ...).
        """
        kwargs.setdefault("bias", linear.bias is not None)
        module = cls(
            linear.in_features,
            linear.out_features,
            device="meta",
            dtype=linear.weight.dtype,
            **kwargs,
        )
        module.linear = linear
        return module

    def forward(
        self, input: Tensor, target: Tensor, token_weight: Tensor | None = None
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        """The loss of ``self.linear(input)`` (and stats with ``return_stats``); errors name
        ``LinearCrossEntropyLoss``."""
        head = (input, self.linear.weight, target, self.linear.bias, self.weight, token_weight)
        return named_linear_cross_entropy("LinearCrossEntropyLoss", head, CallOptions.of(self))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, {CallOptions.describe(self, _MODULE_OPTIONS)}"
        )
