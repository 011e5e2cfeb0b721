"""Fused linear + cross-entropy that never materialises the full (N, V) logits.

``linear_cross_entropy(input, W, target)`` equals
``F.cross_entropy(F.linear(input, W, b), target)`` (the signature and semantics of PyTorch
2.13's ``torch.nn.functional.linear_cross_entropy``), but walks the N token rows in chunks. For
each chunk of rows:

1. ``logits = x_c @ W.T (+ b)`` into one reused (chunk, V) buffer (cuBLAS on CUDA);
2. the fused kernel (``loss_and_grad_rows``) writes the per-row loss and overwrites the logits
   IN PLACE with ``scale * d loss / d logits`` -- the only pass over the logits besides the GEMMs;
3. ``grad_x_c = g @ W``, ``grad_W += g.T @ x_c`` (float32 accumulator), ``grad_b += g.sum(0)``.

Peak extra memory is therefore one chunk of logits plus the gradients themselves, never N x V.
With a scalar reduction the mean normaliser over ALL targets is computed first, so each chunk's
gradient is final up to ``grad_output``; backward only scales the three saved gradients. With
``reduction="none"`` (one upstream gradient per token) forward computes only the loss and
backward recomputes the chunks with the per-row factors applied.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .cross_entropy import (
    _scale_in_place,
    check_class_indices,
    loss_and_grad_rows,
    mean_denominator,
)

__all__ = ["LinearCrossEntropyLoss", "linear_cross_entropy", "planned_chunk_rows"]

_REDUCTIONS = ("none", "mean", "sum")
_ACCUMULATIONS = ("float32", "input")
# Default budget for one chunk of logits: 256 MiB keeps the chunk small next to the weight
# gradient of an LLM head while each GEMM stays large enough to run at full cuBLAS speed.
CHUNK_BYTES = 1 << 28
# On CPU: 32 MiB. The torch fallback makes a few chunk-sized float32 temporaries, and CPU GEMMs
# already run at full speed with a few hundred rows.
CPU_CHUNK_BYTES = 1 << 25
# Chunk row counts are rounded down to a multiple of this (GEMM tile friendly) when possible.
_ROW_ALIGN = 128

Accumulation = Literal["float32", "input"]


def planned_chunk_rows(
    num_rows: int,
    num_classes: int,
    dtype: torch.dtype,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Number of token rows per chunk, i.e. the logits buffer holds (rows, num_classes).

    Default (``chunk_size=None``): ``rows = budget // (num_classes * element_size)``, the most
    rows whose logits fit the budget (``CHUNK_BYTES`` = 256 MiB; ``CPU_CHUNK_BYTES`` = 32 MiB on
    CPU), rounded down to a multiple of 128 when at least 128, at least 1, and at most
    ``num_rows``. E.g. GPU: V=128256 bf16 -> 1024 rows (250 MiB), V=32000 fp32 -> 2048 rows;
    CPU: V=32000 fp32 -> 256 rows (31 MiB).

    Args:
        num_rows: N, the number of token rows (0 allowed).
        num_classes: V.
        dtype: dtype of the logits (the input's dtype).
        chunk_size: explicit rows per chunk (>= 1), or None for the default above.
        device: where the logits live; None counts as a GPU.

    Returns:
        Rows per chunk, in [1, max(num_rows, 1)].
    """
    if chunk_size is not None:
        rows = chunk_size
    else:
        elem = torch.empty((), dtype=dtype).element_size()
        on_cpu = device is not None and torch.device(device).type == "cpu"
        budget = CPU_CHUNK_BYTES if on_cpu else CHUNK_BYTES
        rows = budget // max(num_classes * elem, 1)
        if rows >= _ROW_ALIGN:
            rows -= rows % _ROW_ALIGN
    return max(1, min(rows, num_rows))


# --------------------------------------------------------------------------------------------
# The chunked loop
# --------------------------------------------------------------------------------------------


class _Opts:
    """Loss options plus how to chunk and accumulate (plain attributes, no tensors)."""

    __slots__ = ("accumulation", "chunk_rows", "ignore_index", "label_smoothing", "reduction")

    def __init__(self, ignore_index, label_smoothing, reduction, chunk_rows, accumulation):
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.chunk_rows = chunk_rows
        self.accumulation = accumulation


class _WeightGrad:
    """Accumulates grad_W = sum over chunks of g_c.T @ x_c without losing precision.

    ``accumulation="float32"``: a float32 (V, D) buffer for half-precision weights, cast once at
    the end (float32/float64 weights accumulate directly in the gradient's own dtype).
    ``accumulation="input"``: ``addmm_`` straight into the gradient in the weight's dtype; cuBLAS
    sums each chunk's product in float32 but the running sum is rounded once per chunk. Saves the
    V x D x 4 bytes of the float32 buffer (the memory-saving setting).
    """

    def __init__(self, weight: Tensor, accumulation: str) -> None:
        self.out_dtype = weight.dtype
        half = weight.dtype in (torch.float16, torch.bfloat16)
        self.acc_dtype = torch.float32 if half and accumulation == "float32" else weight.dtype
        # Uninitialised: the first chunk writes with beta=0; no chunk at all -> zeros at the end.
        self.acc = torch.empty(weight.shape, dtype=self.acc_dtype, device=weight.device)
        self.started = False

    def add(self, g: Tensor, x: Tensor) -> None:
        """acc += g.T @ x for g (rows, V), x (rows, D), both in the weight's dtype."""
        beta = 1.0 if self.started else 0.0
        self.started = True
        if self.acc_dtype == g.dtype:
            torch.addmm(self.acc, g.t(), x, beta=beta, out=self.acc)
        elif g.is_cuda:
            _addmm_fp32_cuda(self.acc, g, x, beta)
        else:  # CPU half-precision GEMMs are emulated anyway: do this one in float32
            torch.addmm(self.acc, g.t().float(), x.float(), beta=beta, out=self.acc)

    def result(self) -> Tensor:
        if not self.started:
            self.acc.zero_()
        return self.acc if self.acc_dtype == self.out_dtype else self.acc.to(self.out_dtype)


_CUDA_OUT_DTYPE_OK: bool | None = None  # whether addmm(..., out_dtype=float32) works here


def _addmm_fp32_cuda(acc: Tensor, g: Tensor, x: Tensor, beta: float) -> None:
    """acc (float32) = beta * acc + g.T @ x with half-precision g, x: one mixed-precision GEMM.

    Uses cuBLAS's half-in/float32-out GEMM (``torch.addmm(..., out_dtype=torch.float32)``, torch
    2.8+). Where that is unavailable, falls back to per-slab half GEMMs added into ``acc``: each
    chunk's product is rounded once, but the running sum stays float32.
    """
    global _CUDA_OUT_DTYPE_OK
    if _CUDA_OUT_DTYPE_OK is not False:
        try:
            torch.addmm(acc, g.t(), x, beta=beta, out_dtype=torch.float32, out=acc)
            _CUDA_OUT_DTYPE_OK = True
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            if _CUDA_OUT_DTYPE_OK:  # it worked before: a real error, not a missing overload
                raise
            _CUDA_OUT_DTYPE_OK = False
    slab = max(1, CHUNK_BYTES // max(x.shape[1] * 4, 1))  # temporary <= CHUNK_BYTES / 2
    for start in range(0, acc.shape[0], slab):
        part = torch.mm(g[:, start : start + slab].t(), x)
        dst = acc[start : start + slab]
        if beta == 0.0:
            dst.copy_(part)
        else:
            dst.add_(part)


def _chunk_logits(x_c: Tensor, W: Tensor, b: Tensor | None, buf: Tensor) -> Tensor:
    """x_c @ W.T (+ b) written into ``buf`` (rows, V), a slice of the reused logits buffer."""
    if b is None:
        return torch.mm(x_c, W.t(), out=buf)
    return torch.addmm(b, x_c, W.t(), out=buf)


def _scale_for(target: Tensor, weight: Tensor | None, opts: _Opts, device) -> Tensor:
    """() float32 device scalar: 1 / mean normaliser over ALL rows (0 if nothing to average)."""
    if opts.reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    denom = mean_denominator(target, weight, opts.ignore_index, target.shape[0])
    # Documented deviation from torch (as kernels.cross_entropy): mean over nothing gives 0.
    return torch.where(denom > 0, 1.0 / denom, 0.0)


def _chunked_pass(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    opts: _Opts,
    scale: Tensor | None,
    needs: tuple[bool, bool, bool],
    row_factor: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One sweep over the token chunks: per-row loss and (optionally) the three gradients.

    Args:
        x: (N, D) input rows, contiguous. W: (V, D). b: (V,) or None.
        target: (N,) class indices. weight: (V,) float32/float64 class weights or None.
        opts: loss options and chunk rows.
        scale: () float32 gradient scale (1 / mean normaliser, or 1); None: no gradients.
        needs: which of (grad_x, grad_W, grad_b) to compute (ignored without ``scale``).
        row_factor: (N,) per-row factors applied to the gradient rows (reduction="none"), or None.

    Returns:
        (N,) per-row loss (float32, float64 for float64 input), grad_x (N, D), grad_W (V, D),
        grad_b (V,), each None where not computed.
    """
    if torch.is_autocast_enabled(x.device.type):
        # The operands already have the autocast dtype; keep the float32 accumulation float32.
        with torch.autocast(x.device.type, enabled=False):
            return _chunked_pass(x, W, b, target, weight, opts, scale, needs, row_factor)
    N, _ = x.shape
    V = W.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss_rows = torch.empty(N, dtype=acc, device=x.device)
    want = scale is not None
    gx = torch.empty_like(x) if want and needs[0] else None
    gw = _WeightGrad(W, opts.accumulation) if want and needs[1] else None
    gb = torch.zeros(V, dtype=acc, device=x.device) if want and needs[2] else None
    rows = opts.chunk_rows
    buf = torch.empty((min(rows, N), V), dtype=x.dtype, device=x.device)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        x_c = x[start:end]
        logits = _chunk_logits(x_c, W, b, buf[: end - start])
        grad = logits if want else None  # the gradient overwrites the logits in place
        loss_rows[start:end] = loss_and_grad_rows(
            logits,
            target[start:end],
            weight,
            opts.ignore_index,
            opts.label_smoothing,
            grad,
            scale,
        )
        if not want:
            continue
        if row_factor is not None:
            _scale_in_place(logits, row_factor[start:end], per_row=True)
        if gx is not None:
            torch.mm(logits, W, out=gx[start:end])
        if gw is not None:
            gw.add(logits, x_c)
        if gb is not None:
            gb += logits.sum(0, dtype=acc)
    del buf
    grad_w = gw.result() if gw is not None else None
    grad_b = gb.to(b.dtype) if gb is not None and b is not None else None
    return loss_rows, gx, grad_w, grad_b


def _reduce(loss_rows: Tensor, scale: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total * scale.to(total.dtype) if reduction == "mean" else total


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Scalar reductions: gradients computed in forward, scaled in backward. "none": recompute."""

    @staticmethod
    def forward(ctx, x, W, b, target, weight, opts):  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.opts = opts
        ctx.has_bias = b is not None
        scale = _scale_for(target, weight, opts, x.device)
        if opts.reduction == "none":
            # Per-token upstream gradients are only known in backward: recompute there.
            loss_rows, *_ = _chunked_pass(x, W, b, target, weight, opts, None, needs)
            ctx.save_for_backward(x, W, b, target, weight)
            return loss_rows
        loss_rows, gx, gw, gb = _chunked_pass(x, W, b, target, weight, opts, scale, needs)
        ctx.grads = [gx, gw, gb]
        return _reduce(loss_rows, scale, opts.reduction)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        opts = ctx.opts
        if opts.reduction == "none":
            x, W, b, target, weight = ctx.saved_tensors
            needs = tuple(ctx.needs_input_grad[:3])
            scale = torch.ones((), dtype=torch.float32, device=x.device)
            factor = grad_output.reshape(-1).float().contiguous()
            _, gx, gw, gb = _chunked_pass(x, W, b, target, weight, opts, scale, needs, factor)
            return gx, gw, gb, None, None, None
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "kernels.linear_cross_entropy: backward ran twice through the same graph "
                "(retain_graph=True). The fused gradients are consumed by the first backward; "
                "compute the loss again for a second backward."
            )
        ctx.grads = None
        out = []
        for grad in grads:
            if grad is not None:
                # In place, and without a host sync on CUDA: a factor of exactly 1 moves no data.
                view = grad.reshape(1, -1) if grad.dim() == 1 else grad
                _scale_in_place(view, grad_output, per_row=False)
            out.append(grad)
        return out[0], out[1], out[2], None, None, None


# --------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (no graph break; backward out of place)
# --------------------------------------------------------------------------------------------


def _empty(like: Tensor) -> Tensor:
    """Placeholder for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty((0,))


def _fake_grads(x: Tensor, W: Tensor, b: Tensor | None, now: bool, needs: list[bool]):
    """Meta outputs (grad_x, grad_W, grad_b) of the two ops, empty where not computed."""
    gx = torch.empty_like(x) if now and needs[0] else _empty(x)
    gw = torch.empty_like(W) if now and needs[1] else _empty(x)
    gb = torch.empty_like(b) if now and needs[2] and b is not None else _empty(x)
    return gx, gw, gb


@torch.library.custom_op("fusedce::linear_cross_entropy", mutates_args=())
def _lce_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_rows: int,
    accumulation: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_W, grad_b); the gradients are empty where not needed, and always for
    reduction="none" (computed in the backward op instead)."""
    check_class_indices(target, W.shape[0], ignore_index)
    opts = _Opts(ignore_index, label_smoothing, reduction, chunk_rows, accumulation)
    scale = _scale_for(target, weight, opts, x.device)
    grads_now = reduction != "none" and any(needs)
    loss_rows, gx, gw, gb = _chunked_pass(
        x, W, b, target, weight, opts, scale if grads_now else None, tuple(needs)
    )
    loss = _reduce(loss_rows, scale, reduction)
    return loss, *(g if g is not None else _empty(x) for g in (gx, gw, gb))


@_lce_op.register_fake
def _(
    x,
    W,
    b,
    target,
    weight,
    ignore_index,
    label_smoothing,
    reduction,
    chunk_rows,
    accumulation,
    needs,
):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=acc)
    return loss, *_fake_grads(x, W, b, reduction != "none", needs)


@torch.library.custom_op("fusedce::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(
    grad_output: Tensor,
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    chunk_rows: int,
    accumulation: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none": recompute the chunks with one upstream factor per row."""
    opts = _Opts(ignore_index, label_smoothing, "none", chunk_rows, accumulation)
    scale = torch.ones((), dtype=torch.float32, device=x.device)
    factor = grad_output.reshape(-1).float().contiguous()
    _, gx, gw, gb = _chunked_pass(x, W, b, target, weight, opts, scale, tuple(needs), factor)
    return tuple(g if g is not None else _empty(x) for g in (gx, gw, gb))


@_lce_backward_op.register_fake
def _(
    grad_output,
    x,
    W,
    b,
    target,
    weight,
    ignore_index,
    label_smoothing,
    chunk_rows,
    accumulation,
    needs,
):
    return _fake_grads(x, W, b, True, needs)


def _lce_setup_context(ctx, inputs, output):
    x, W, b, target, weight, ignore_index, ls, reduction, chunk_rows, accumulation, needs = inputs
    ctx.reduction = reduction
    ctx.args = (ignore_index, ls, chunk_rows, accumulation, needs)
    ctx.has_bias = b is not None
    if reduction == "none":
        ctx.save_for_backward(x, W, b, target, weight)
    else:
        ctx.save_for_backward(*output[1:])


def _lce_backward(ctx, grad_loss, *_unused):
    if ctx.reduction == "none":
        x, W, b, target, weight = ctx.saved_tensors
        gx, gw, gb = _lce_backward_op(grad_loss, x, W, b, target, weight, *ctx.args)
    else:
        gx, gw, gb = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    needs = ctx.args[-1]
    gx, gw = (g if need else None for g, need in zip((gx, gw), needs[:2], strict=True))
    gb = gb if needs[2] and ctx.has_bias else None
    return gx, gw, gb, None, None, None, None, None, None, None, None


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_args(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    reduction: str,
    label_smoothing: float,
    chunk_size: int | None,
    accumulation: str,
) -> None:
    """Raises a clear exception for any argument linear_cross_entropy cannot take."""
    name = "linear_cross_entropy"
    for arg, what in ((input, "input"), (linear_weight, "linear_weight"), (target, "target")):
        if not isinstance(arg, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(arg).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"{name}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if accumulation not in _ACCUMULATIONS:
        raise ValueError(
            f"{name}: accumulation must be one of {_ACCUMULATIONS}, got {accumulation!r}"
        )
    if not input.is_floating_point():
        raise TypeError(f"{name}: input must be a floating tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{name}: input must have shape (D,), (N, D) or (..., D), got a scalar")
    if linear_weight.dim() != 2:
        if linear_weight.dim() > 2:
            raise NotImplementedError(
                f"{name}: K-dimensional linear_weight of shape {tuple(linear_weight.shape)} is "
                "not supported; pass a 2-D (V, D) weight"
            )
        raise ValueError(
            f"{name}: linear_weight must be 2-D (V, D), got {tuple(linear_weight.shape)}"
        )
    V, D = linear_weight.shape
    if V == 0:
        raise ValueError(f"{name}: linear_weight has 0 classes (shape {(V, D)})")
    if input.shape[-1] != D:
        raise ValueError(
            f"{name}: input has {input.shape[-1]} features (shape {tuple(input.shape)}) but "
            f"linear_weight of shape {(V, D)} expects D={D}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"{name}: input ({input.dtype}) and linear_weight ({linear_weight.dtype}) must "
            "have the same dtype"
        )
    devices = {("linear_weight", linear_weight.device), ("target", target.device)}
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (V,):
            shape = tuple(linear_bias.shape) if isinstance(linear_bias, Tensor) else linear_bias
            raise ValueError(f"{name}: linear_bias must have shape ({V},), got {shape}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(
                f"{name}: linear_bias ({linear_bias.dtype}) must have the input's dtype "
                f"({input.dtype})"
            )
        devices.add(("linear_bias", linear_bias.device))
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.numel() != V:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(
                f"{name}: weight must be a 1-D tensor of {V} class weights, got {shape}"
            )
        if not weight.is_floating_point():
            raise TypeError(f"{name}: weight must be floating point, got {weight.dtype}")
        devices.add(("weight", weight.device))
    for what, device in sorted(devices, key=lambda d: d[0]):
        if device != input.device:
            raise ValueError(f"{name}: {what} is on {device} but input is on {input.device}")
    expected = tuple(input.shape[:-1])
    if target.is_floating_point() and tuple(target.shape) == (*expected, V):
        raise NotImplementedError(
            f"{name}: probability (soft) targets are not supported; pass class indices of shape "
            f"{expected}, or use kernels.cross_entropy on materialised logits"
        )
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{name}: target of shape {tuple(target.shape)} does not fit input of shape "
            f"{tuple(input.shape)}: expected class indices of shape {expected}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: class-index targets must be int64 or int32, got {target.dtype}")


def _autocast_cast(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under autocast, run the GEMMs in the autocast dtype as F.linear would."""
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
) -> Tensor:
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
            over all tokens. "input" accumulates straight into the weight's dtype (rounded once
            per chunk) and saves those V * D * 4 bytes. No effect for float32 weights.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or ``input.shape[:-1]`` for
        reduction="none".

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or options.
        IndexError: a class index outside [0, V) other than ignore_index.
        NotImplementedError: probability targets, K-dimensional linear_weight.

    Deviations from torch: the loss is float32 for half-precision input (as
    ``kernels.cross_entropy``); reduction="mean" over nothing (every target ignored, or no rows)
    gives 0 and zero gradients instead of NaN; any input shape (..., D) is accepted. As with
    torch's chunked path, backward twice through the same graph (retain_graph=True) raises for
    the scalar reductions, and higher-order gradients are not supported.
    """
    if ignore_index is None:
        ignore_index = -100
    _check_args(
        input,
        linear_weight,
        target,
        linear_bias,
        weight,
        reduction,
        label_smoothing,
        chunk_size,
        accumulation,
    )
    input, linear_weight, linear_bias = _autocast_cast(input, linear_weight, linear_bias)
    V, D = linear_weight.shape
    out_shape = tuple(target.shape)
    x = input.reshape(-1, D).contiguous()
    t = target.reshape(-1)
    if not torch.compiler.is_compiling():  # the custom op checks inside, opaque to dynamo
        check_class_indices(t, V, ignore_index)
    if weight is not None:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = weight.to(acc).contiguous()
    rows = planned_chunk_rows(x.shape[0], V, x.dtype, chunk_size, x.device)
    opts = _Opts(ignore_index, float(label_smoothing), reduction, rows, accumulation)
    params = (input, linear_weight, linear_bias)
    need_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if torch.compiler.is_compiling():
        needs = [need_grad and p is not None and p.requires_grad for p in params]
        loss, *_ = _lce_op(
            x,
            linear_weight,
            linear_bias,
            t,
            weight,
            ignore_index,
            float(label_smoothing),
            reduction,
            rows,
            accumulation,
            needs,
        )
    elif need_grad:
        loss = _LinearCrossEntropy.apply(x, linear_weight, linear_bias, t, weight, opts)
    else:
        scale = _scale_for(t, weight, opts, x.device)
        loss_rows, *_ = _chunked_pass(
            x, linear_weight, linear_bias, t, weight, opts, None, (False,) * 3
        )
        loss = _reduce(loss_rows, scale, reduction)
    return loss.reshape(out_shape) if reduction == "none" else loss


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
    ) -> None:
        super().__init__()
        self._check(reduction, label_smoothing, chunk_size, accumulation)
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.accumulation = accumulation

    @staticmethod
    def _check(reduction, label_smoothing, chunk_size, accumulation) -> None:
        name = "LinearCrossEntropyLoss"
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"{name}: chunk_size must be a positive int or None, got {chunk_size}")
        if accumulation not in _ACCUMULATIONS:
            raise ValueError(f"{name}: accumulation must be one of {_ACCUMULATIONS}")

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

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
            accumulation=self.accumulation,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"chunk_size={self.chunk_size}, accumulation={self.accumulation!r}"
        )
