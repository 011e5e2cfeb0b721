"""``cross_entropy`` and ``CrossEntropyLoss``: torch's signatures on the fused row contract.

This file holds the functional API and the module: the keywords become one ``CallOptions``,
the tensors are checked (``validation.py``) and flattened, and the call goes to one path: the
sharded route (``sharded/``), ``func_transforms.py``, a backend's small-call shortcut, the
custom op (``custom_ops.py``, under ``torch.compile``) or the autograd Function
(``autograd_functions.py``); the computation is ``core.py`` on a backend of ``backends``.

Scalar reductions compute the loss AND the gradient in one pass over the logits; backward only
multiplies the saved gradient by ``grad_output`` (nothing at all, without a host sync, when it
is exactly 1). ``reduction="none"`` computes the loss and each row's log-sum-exp in forward; its
backward writes the gradient once, with each row's upstream factor folded in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import backends, core, func_transforms, index_check
from .autograd_functions import FusedCrossEntropy
from .core import CrossEntropyStats
from .custom_ops import cross_entropy_op as _cross_entropy_op
from .custom_ops import float_options_as_tensor
from .options import (
    CallOptions,
    LossOptions,
    accumulation_dtype,
    index_target_for_kernels,
    prepare_class_weight,
    prepare_token_weight,
    to_op_args,
)
from .sharded import route as sharded
from .validation import check_cross_entropy_args, check_token_weight, logits_rows, loss_shape

__all__ = ["CrossEntropyLoss", "CrossEntropyStats", "cross_entropy"]

_WHO = "cross_entropy"
# The options ``CrossEntropyLoss`` holds as attributes (``CallOptions.hold``; read back by
# ``CallOptions.of``), in the order of its repr.
_MODULE_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "inplace_backward")
_MODULE_OPTIONS += ("logit_scale", "softcap", "z_loss", "return_stats")


# The only repeated parameter lists of the public layer: the signatures of both losses (the
# functions and modules here and in linear_cross_entropy_loss.py, vocab_parallel/api.py) keep
# torch's keyword lists, and the custom ops (custom_ops.py) their schemas, because callers pass
# those by name and compiled graphs by schema; below them the options travel as one
# ``CallOptions`` (``CallOptions.of_keywords``), the tensors as one tuple.
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
    process_group: object = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy between logits and targets: ``torch.nn.functional.cross_entropy``, fused.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ..., dk); float32, float16, bfloat16
            (or float64, which takes the torch backend); any strides.
        target: class indices (int64, int32 or uint8) of shape (), (N,) or (N, d1, ..., dk), or
            class probabilities of the input's shape (soft targets: H(P, Q) = -sum_x P(x)
            log Q(x)); probabilities may require grad (their gradient is computed as torch's).
        weight: optional (C,) class weights (not differentiable, as in torch).
        ignore_index: class index that contributes neither loss nor gradient (class indices);
            None means -100.
        reduction: "none" (per-element loss of the target's shape), "mean" or "sum".
        label_smoothing: amount in [0, 1] of uniform smoothing of the target distribution.
        inplace_backward: write the gradient into the logits' storage instead of a new buffer:
            saves one logits-sized allocation, but the logits are overwritten (by forward for
            "mean"/"sum", by backward for "none"): nothing may read them afterwards (autograd
            raises if a saved tensor was overwritten). Only where the (N, C) view of the input
            is contiguous and the input is not a leaf that requires grad; not while the target
            requires grad (its gradient reads the logits).
        logit_scale: s > 0; the loss sees z = s * x (a logit scale; 1 / T for a temperature T).
        softcap: c > 0 or None; then z = c * tanh(z / c), after the scale.
        z_loss: lambda >= 0; each non-ignored element adds lambda * logsumexp(z)**2.
        token_weight: optional float tensor of the per-element loss shape ((), (N,) or
            (N, d1, ..., dk)), finite and >= 0, not differentiated: element i contributes
            t_i * (l_i + lambda * lse_i**2); "mean" divides by sum_i t_i * w_{y_i} over the
            non-ignored elements (sum_i t_i for probabilities).
        return_stats: also return a ``CrossEntropyStats`` (z_loss part, lse, entropy,
            correct), computed in the same pass.
        process_group: a ``torch.distributed.ProcessGroup`` over which the class dimension is
            split: ``input`` is then this rank's slice of the logits and ``target`` holds global
            class indices; see ``fusedce.vocab_parallel.vocab_parallel_cross_entropy`` (also
            taken for a ``DTensor`` input sharded on the class dimension, without a group).
            None (the default) is the unsharded loss; so is ``torch.distributed.group.WORLD``
            before ``init_process_group``, which is None then.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or the shape above for "none";
        with ``return_stats`` the tuple ``(loss, stats)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or options (``logit_scale <= 0``,
            ``softcap <= 0``, ``z_loss < 0``, token weights of the wrong shape, dtype or device,
            negative or non-finite; a ``process_group`` that is not a ProcessGroup). Every
            message starts with the name of the function called (``cross_entropy``, or
            ``CrossEntropyLoss`` for the module).
        IndexError: a class index outside [0, C) other than ignore_index (see
            ``set_target_check``; on CUDA raised from backward when a gradient is wanted).
        RuntimeError: ``weight.requires_grad`` or ``token_weight.requires_grad``;
            ``inplace_backward`` on a leaf that requires
            grad; double backward (``create_graph=True``); a ``process_group`` while
            ``torch.distributed`` is not initialised.

    Deviations from torch: reduction="mean" with nothing to average (every target ignored, or an
    empty batch) gives 0.0 and a zero gradient instead of NaN; a probability of 0 times a logit
    of -inf contributes 0 (its limit), not NaN. Calling backward twice through the same graph
    (retain_graph=True) raises in eager mode for "mean" and "sum": the first backward consumes
    the fused gradient.
    """
    call = CallOptions.of_keywords(locals())
    return named_cross_entropy(_WHO, (input, target, weight, token_weight), call, process_group)


def _flatten(
    who: str, tensors: tuple, opts: LossOptions
) -> tuple[Tensor, Tensor, Tensor | None, tuple[int, ...], Tensor | None]:
    """Checks the tensors (input, target, weight, token_weight); returns (logits (M, C) with
    unit stride along C, target (M,) or (M, C), class weights (C,), the per-element loss shape,
    token weights (M,) or None), as the backends read them."""
    input, target, weight, token_weight = tensors
    soft = check_cross_entropy_args(who, input, target, weight, opts.ignore_index)
    out_shape = loss_shape(input)
    check_token_weight(who, token_weight, out_shape, input.device)
    if not soft:
        target = index_target_for_kernels(target, opts.ignore_index)
    logits, target = logits_rows(input, target, soft)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if soft and target.stride(-1) != 1:
        target = target.contiguous()
    weight = prepare_class_weight(weight, input.dtype)
    return logits, target, weight, out_shape, prepare_token_weight(token_weight, input.dtype)


def named_cross_entropy(
    who: str, tensors: tuple, call: CallOptions, process_group: object = None
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``cross_entropy`` of ``tensors`` (input, target, weight, token_weight) for the public
    function ``who`` (``cross_entropy``, ``CrossEntropyLoss``, or the vocabulary-parallel
    function on one rank): every error names it."""
    compiling = torch.compiler.is_compiling()
    input = tensors[0]
    if sharded.wants_vocab_parallel(input, process_group):
        if func_transforms.active():
            raise func_transforms.refuse_sharded(who)
        sharded.refuse_unsharded_options(who, inplace_backward=call.inplace_backward)
        return sharded.call_sharded(
            sharded.CE, who, tensors, call, process_group, plain=named_cross_entropy
        )
    opts = call.loss_options(who)
    inplace_backward = call.inplace_backward
    logits, target, weight, out_shape, tw = _flatten(who, tensors, opts)
    extras = bool(call.return_stats)
    if func_transforms.active():
        # torch.func.grad / vmap / jacrev ...: differentiable torch ops, same semantics.
        return func_transforms.cross_entropy(
            logits, target, weight, opts, tw, out_shape, extras, who
        )
    grad_enabled = torch.is_grad_enabled()
    need_grad = grad_enabled and input.requires_grad
    target_grad = grad_enabled and target.requires_grad
    scale = None
    shortcut = None if compiling else backends.small_call(logits)
    if shortcut is not None:
        # The backend may take the whole call (small plain CPU calls: torch's F.cross_entropy).
        out = shortcut(
            logits, target, weight, opts, tw, out_shape, extras, inplace_backward, target_grad, who
        )
        if out is not None:
            return out
    if compiling:
        grad_now = need_grad and not opts.per_row
        op_args = to_op_args(opts, float_options_as_tensor(logits, opts, target_grad))
        rest = {"grad_now": grad_now, "token_weight": tw, "extras": extras, "who": who}
        loss, _, stats = _cross_entropy_op(logits, target, weight, **rest, **op_args)
    elif need_grad or target_grad:
        if inplace_backward and input.is_leaf and input.requires_grad:
            raise RuntimeError(
                f"{who}: inplace_backward=True would overwrite a leaf tensor that requires "
                "grad; pass a non-leaf tensor (e.g. the output of the last layer) or "
                "inplace_backward=False"
            )
        inplace = inplace_backward and need_grad and logits.is_contiguous()
        loss, stats = FusedCrossEntropy.apply(
            logits, target, weight, opts, inplace, tw, extras, who
        )
    else:
        with index_check.reporting_as(who):
            fwd = core.forward(logits, target, weight, opts, False, token_weight=tw, extras=extras)
        loss, stats, scale = fwd.loss, fwd.stats, fwd.scale
    loss = loss.reshape(out_shape) if opts.per_row else loss
    if not extras:
        return loss
    if scale is None and opts.mean:
        acc = accumulation_dtype(logits.dtype)
        scale = core.inverse_normaliser(
            core.mean_normaliser(target, weight, opts.ignore_index, acc, tw)
        )
    return loss, core.public_stats(stats, scale, opts, out_shape)


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` on the fused kernel; see :func:`cross_entropy`.

    Shapes: input (C,), (N, C) or (N, C, d1, ..., dk); target (), (N,) or (N, d1, ..., dk) class
    indices, or probabilities of the input's shape; output a scalar, or the target's shape for
    reduction="none".
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        inplace_backward: bool = False,
        *,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        CallOptions.hold(self, locals(), _MODULE_OPTIONS)
        self.register_buffer("weight", weight)

    def forward(
        self, input: Tensor, target: Tensor, token_weight: Tensor | None = None
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        """The loss (and stats with ``return_stats``); ``token_weight`` per element, or None.
        Errors name ``CrossEntropyLoss``."""
        call = CallOptions.of(self)
        tensors = (input, target, self.weight, token_weight)
        return named_cross_entropy("CrossEntropyLoss", tensors, call)

    def extra_repr(self) -> str:
        return CallOptions.describe(self, _MODULE_OPTIONS)
