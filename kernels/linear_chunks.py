"""The chunked loop of the fused linear head: never more than one chunk of (rows, V) logits.

For each chunk of token rows: the logits ``x_c @ W.T (+ b)`` into one reused buffer (cuBLAS on
CUDA); the row contract (``core.run_rows``) writes the per-row loss and overwrites the logits IN
PLACE with the scaled gradient; then ``grad_x_c = g @ W``, ``grad_W += g.T @ x_c`` (float32
accumulator by default) and ``grad_b += g.sum(0)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from . import core
from .options import LossOptions, accumulation_dtype

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


class WeightGrad:
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
        elif g.dtype == torch.bfloat16:
            # No mixed-precision addmm on the CPU; bfloat16 GEMMs (float32 sums inside) run ~4x
            # faster than float32 ones on upcast copies: round each product once, sum in float32.
            _addmm_fp32_slabs(self.acc, g, x, beta, CPU_CHUNK_BYTES)
        else:  # float16 GEMMs are emulated on most CPUs: this one in float32
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
    _addmm_fp32_slabs(acc, g, x, beta, CHUNK_BYTES)


def _addmm_fp32_slabs(acc: Tensor, g: Tensor, x: Tensor, beta: float, budget: int) -> None:
    """acc (float32) = beta * acc + g.T @ x, one half-precision GEMM per slab of acc's rows:
    each product is rounded once to g's dtype, the running sum stays float32. The temporary
    slab holds at most ``budget / 2`` bytes."""
    slab = max(1, budget // max(x.shape[1] * 4, 1))
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


def chunked_pass(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    chunk_rows: int,
    accumulation: str,
    scale: Tensor | None,
    needs: tuple[bool, bool, bool],
    token_weight: Tensor | None = None,
    extras: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One sweep over the token chunks: per-row stats and (optionally) the three gradients.

    Args:
        x: (N, D) input rows, contiguous. W: (V, D). b: (V,) or None.
        target: (N,) class indices. weight: (V,) float32/float64 class weights or None.
        opts: the loss options (all but the reduction).
        chunk_rows: token rows per chunk.
        accumulation: "float32" or "input", see ``WeightGrad``.
        scale: the gradient scale, () (1 / mean normaliser, or 1) or (N,) (one upstream factor
            per row, reduction="none"); None: no gradients.
        needs: which of (grad_x, grad_W, grad_b) to compute (ignored without ``scale``).
        token_weight: (N,) prepared token weights, or None.
        extras: also fill the return_stats rows (see ``core``).

    Returns:
        (4, N) or (7, N) per-row stats (``core``'s rows; float32, float64 for float64 input),
        grad_x (N, D), grad_W (V, D), grad_b (V,), each None where not computed.
    """
    if torch.is_autocast_enabled(x.device.type):
        # The operands already have the autocast dtype; keep the float32 accumulation float32.
        with torch.autocast(x.device.type, enabled=False):
            return chunked_pass(
                x,
                W,
                b,
                target,
                weight,
                opts,
                chunk_rows,
                accumulation,
                scale,
                needs,
                token_weight,
                extras,
            )
    N, _ = x.shape
    V = W.shape[0]
    acc = accumulation_dtype(x.dtype)
    # The stats of all N rows (a few floats per row), chunk by chunk: the loss, and what
    # return_stats reports, come from the chunks the loop computes anyway.
    stats = core.new_stats(N, x.dtype, x.device, extras)
    want = scale is not None
    per_row = want and scale.dim() == 1
    gx = torch.empty_like(x) if want and needs[0] else None
    gw = WeightGrad(W, accumulation) if want and needs[1] else None
    gb = torch.zeros(V, dtype=acc, device=x.device) if want and needs[2] else None
    buf = torch.empty((min(chunk_rows, N), V), dtype=x.dtype, device=x.device)
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        x_c = x[start:end]
        logits = _chunk_logits(x_c, W, b, buf[: end - start])
        # The gradient overwrites the logits in place, each row's factor folded in: one rounding.
        grad = logits if want else None
        chunk_scale = scale[start:end] if per_row else scale
        chunk_tw = token_weight[start:end] if token_weight is not None else None
        core.run_rows(
            logits,
            target[start:end],
            weight,
            opts,
            stats[:, start:end],
            grad,
            chunk_scale,
            False,
            chunk_tw,
        )
        if not want:
            continue
        if gx is not None:
            torch.mm(logits, W, out=gx[start:end])
        if gw is not None:
            gw.add(logits, x_c)
        if gb is not None:
            gb += logits.sum(0, dtype=acc)
    del buf
    grad_w = gw.result() if gw is not None else None
    grad_b = gb.to(b.dtype) if gb is not None and b is not None else None
    return stats, gx, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# The loop's pieces, for row contracts of their own (the distillation losses)
# --------------------------------------------------------------------------------------------


def head_chunks(
    x: Tensor, W: Tensor, b: Tensor | None, chunk_rows: int
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """(rows, x[rows], logits) of each chunk of ``chunk_rows`` token rows of x (N, D): the
    logits x[rows] @ W.T (+ b) in one reused buffer of x's dtype, overwritten by the next chunk
    (a row contract may overwrite them with its gradient in between)."""
    N = x.shape[0]
    buf = torch.empty((min(chunk_rows, N), W.shape[0]), dtype=x.dtype, device=x.device)
    for start in range(0, N, chunk_rows):
        rows = slice(start, min(start + chunk_rows, N))
        x_c = x[rows]
        yield rows, x_c, _chunk_logits(x_c, W, b, buf[: rows.stop - start])


class HeadGrads:
    """The gradients of a fused head that ``needs`` asks for, (grad_x (N, D), grad_W (V, D),
    grad_b (V,)), summed chunk by chunk from each chunk's gradient over its logits."""

    def __init__(
        self,
        x: Tensor,
        W: Tensor,
        b: Tensor | None,
        needs: tuple[bool, bool, bool],
        accumulation: str = "float32",
    ) -> None:
        self.weight, self.bias = W, b
        self.grad_x = torch.empty_like(x) if needs[0] else None
        self.grad_w = WeightGrad(W, accumulation) if needs[1] else None
        # The bias's gradient is a sum over every token row: summed in the accumulation dtype.
        acc = accumulation_dtype(x.dtype)
        self.grad_b = torch.zeros(W.shape[0], dtype=acc, device=x.device) if needs[2] else None

    def add(self, rows: slice, g: Tensor, x_c: Tensor) -> None:
        """Adds the chunk of token ``rows``: g (rows, V) the gradient over its logits, x_c its
        input rows."""
        if self.grad_x is not None:
            torch.mm(g, self.weight, out=self.grad_x[rows])
        if self.grad_w is not None:
            self.grad_w.add(g, x_c)
        if self.grad_b is not None:
            self.grad_b.add_(g.sum(0, dtype=self.grad_b.dtype))

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(grad_x, grad_W, grad_b) in the dtypes of x, W and b; None where not asked (or no
        bias)."""
        grad_w = self.grad_w.result() if self.grad_w is not None else None
        grad_b = None
        if self.grad_b is not None and self.bias is not None:
            grad_b = self.grad_b.to(self.bias.dtype)
        return self.grad_x, grad_w, grad_b
