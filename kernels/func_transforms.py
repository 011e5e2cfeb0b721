"""The losses under ``torch.func`` transforms (grad, vmap, jacrev, jacfwd, hessian, ...).

The fused paths cannot run inside a functorch transform: the autograd Function computes the
gradient in forward and keeps it, the class-index and token-weight checks read values on the
host, and the kernels are opaque to ``vmap``. While a transform is active, the public functions
compute the same loss from differentiable torch ops instead, at every size, with fusedce's
semantics:

* an ignored element gets exactly zero gradient, also where its logits are NaN or infinite
  (its logits are replaced by 0 before any op reads them: a mask applied after the loss would
  multiply NaN by 0);
* ``reduction="mean"`` over nothing (every target ignored, or no elements) gives 0, not NaN;
* a probability of 0 (after smoothing) times a log-probability of -inf contributes 0, and so
  does a class weight of 0 in the smoothing term;
* logit_scale, softcap, z_loss, class and token weights, label smoothing and ``return_stats``
  as on the fused paths; an out-of-range class index raises IndexError (the check reads the
  values of every vmapped sample), or gives a NaN loss row with the check off.

Higher derivatives work too (the fused paths refuse double backward), and so does
``torch.compile`` of a function that applies a transform (the ops here are traced; the class
indices are then not checked: a bad one gives a NaN row). Nothing is fused here:
``linear_cross_entropy`` materialises the (N, V) logits (``chunk_size`` and ``accumulation`` have
no effect), and ``inplace_backward`` writes nothing in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import core, index_check
from .core import CrossEntropyStats
from .options import LossOptions, accumulation_dtype


def active() -> bool:
    """Whether a functorch transform (``torch.func.grad``, ``vmap``, ``jvp``, ...) is running.

    Dynamo reads it as a constant while it traces: False for a plain compiled call (the custom
    ops take it), True inside a transform that ``torch.compile`` traces (this module's ops are
    traced then)."""
    return torch._C._are_functorch_transforms_active()


def transform_name() -> str:
    """The innermost running transform, for messages: "vmap", "grad", "jvp", ..."""
    try:
        from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

        return retrieve_current_functorch_interpreter().key().name.lower()
    except Exception:  # pragma: no cover - a private API; the message only loses the name
        return "a torch.func transform"


def refuse_sharded(who: str) -> NotImplementedError:
    """The error for a vocabulary-parallel call (``process_group`` or a sharded ``DTensor``)
    under a transform: the collectives cannot run on functorch's wrapped tensors."""
    return NotImplementedError(
        f"fusedce.{who}: torch.func transforms ({transform_name()}) are not supported for the "
        "vocabulary-parallel loss (process_group or a sharded DTensor); call it outside the "
        "transform, or gather the logits and call it without a process group"
    )


def _transformed(x: Tensor, opts: LossOptions) -> Tensor:
    """z = softcap(logit_scale * x)."""
    z = x * opts.logit_scale if opts.logit_scale != 1.0 else x
    if opts.softcap is not None:
        z = torch.tanh(z / opts.softcap) * opts.softcap
    return z


def _stats(
    logits: Tensor, target: Tensor, opts: LossOptions, z_part: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (z-loss part, lse, entropy, correct) of ``return_stats``, detached; lse, entropy
    and the argmax also for ignored rows, from their own logits."""
    with torch.no_grad():
        z = _transformed(logits.detach().to(accumulation_dtype(logits.dtype)), opts)
        lse = torch.logsumexp(z, dim=1)
        logp = torch.log_softmax(z, dim=1)  # from the row max: shift-exact, unlike z - lse
        p = logp.exp()
        # H = -sum p log p, with 0 * log 0 = 0 (also where a logit is -inf).
        entropy = -torch.where(p > 0, p * logp, 0.0).sum(1)
        pred = z.argmax(1)
        if target.dim() == 2:
            correct = pred == target.argmax(1)
        else:
            y = target.long()
            ok = (y != opts.ignore_index) & (y >= 0) & (y < z.shape[1])
            correct = ok & (pred == y)
    return z_part.detach(), lse, entropy, correct


def _rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    token_weight: Tensor | None,
    checked: bool,
) -> tuple[Tensor, Tensor | None]:
    """(M,) per-row losses t_i * (l_i + lambda * lse_i**2) and their z-loss parts (None without
    a z-loss), differentiable in the logits (and in probability targets); ``checked``: the
    class indices were checked (else a bad one gives a NaN row)."""
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    V = x.shape[1]
    eps, lam = opts.label_smoothing, opts.z_loss
    soft = target.dim() == 2
    valid = None
    if not soft:
        y = target.long()
        valid = y != opts.ignore_index
        y_ok = valid & (y >= 0) & (y < V)
        y_safe = torch.where(y_ok, y, 0)
        x = torch.where(valid[:, None], x, 0.0)
        if not checked:
            # Unchecked out-of-range indices: a NaN row, as on the fused paths.
            x = torch.where((valid & ~y_ok)[:, None], float("nan"), x)
    z = _transformed(x, opts)
    # log_softmax works from the row max (shift-exact); z - logsumexp(z) would lose every digit
    # at a large common offset. lse itself only feeds the z-loss.
    logp = torch.log_softmax(z, dim=1)
    lse = torch.logsumexp(z, dim=1) if lam > 0.0 else None
    if soft:
        coef = (1.0 - eps) * target.to(acc) + eps / V
        if weight is not None:
            coef = coef * weight
        # 0 * log 0 counts as 0 (its limit) where a logit is -inf; elsewhere the product keeps
        # both derivatives (the target's gradient is -(1 - eps) w_c log p_c, also where p_c = 0).
        loss = -(coef * torch.where((coef == 0) & (logp == -torch.inf), 0.0, logp)).sum(1)
    else:
        nll = -logp.gather(1, y_safe[:, None])[:, 0]
        if weight is not None:
            nll = nll * weight[y_safe]
        loss = nll * (1.0 - eps) if eps != 0.0 else nll
        if eps > 0.0:
            if weight is None:
                w_logp = logp.sum(1)
            else:  # a class weight of 0 keeps 0 * -inf = 0
                w_logp = (torch.where(weight != 0, logp, 0.0) * weight).sum(1)
            loss = loss - (eps / V) * w_logp
        loss = torch.where(valid, loss, 0.0)
    z_part = None
    if lam > 0.0:
        z_part = lam * lse * lse
        if valid is not None:
            z_part = torch.where(valid, z_part, 0.0)
        loss = loss + z_part
    if token_weight is not None:
        loss = loss * token_weight
        z_part = z_part * token_weight if z_part is not None else None
    return loss, z_part


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    token_weight: Tensor | None,
    out_shape: tuple[int, ...],
    extras: bool,
    who: str = "cross_entropy",
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``fusedce.cross_entropy`` of checked, flattened arguments from torch ops.

    Args:
        logits: (M, C) logits. target: (M,) class indices or (M, C) probabilities.
        weight: (C,) class weights in the accumulation dtype, or None.
        opts: the loss options. token_weight: (M,) prepared token weights, or None.
        out_shape: the per-element shape of the loss. extras: also return the stats.
        who: the public function errors name.
    """
    # Traced by torch.compile, the values cannot be read: unchecked, as with the check off.
    checked = index_check.target_check_enabled() and not torch.compiler.is_compiling()
    if checked and target.dim() == 1:
        index_check.check_class_indices(
            index_check.unwrap_functorch(target).reshape(-1),
            logits.shape[1],
            opts.ignore_index,
            who,
        )
    rows, z_part = _rows(logits, target, weight, opts, token_weight, checked)
    scale = None
    if opts.per_row:
        loss = rows.reshape(out_shape)
    elif opts.mean:
        acc = rows.dtype
        denom = core.mean_normaliser(target, weight, opts.ignore_index, acc, token_weight)
        scale = core.inverse_normaliser(denom)
        loss = rows.sum() * scale
    else:
        loss = rows.sum()
    if not extras:
        return loss
    if z_part is None:
        z_part = torch.zeros_like(rows)
    z_part, lse, entropy, correct = _stats(logits, target, opts, z_part)
    if opts.per_row:
        z_loss = z_part.reshape(out_shape)
    else:
        z_loss = z_part.sum() * scale if scale is not None else z_part.sum()
    return loss, CrossEntropyStats(
        z_loss.detach(),
        lse.reshape(out_shape),
        entropy.reshape(out_shape),
        correct.reshape(out_shape),
    )
