"""EXPERIMENTAL, opt-in (``fusedce.set_backend("gluon")``): the fused kernel with each row
staged in shared memory, written in Triton's Gluon dialect for Hopper GPUs.

Why: the portable kernel (``triton_backend.py``) reads a long row twice (one sweep for the
log-sum-exp, one for the gradient); the second read mostly misses L2, which caps it near 1.4-1.6x
the copy time (docs/KERNEL_NOTES.md). Here one program copies its whole row into shared memory
with asynchronous copies (all of it in flight at once), reduces it from shared memory and writes
the gradient from shared memory: one global read and one global write per element.

Scope: class-index targets, optional label smoothing, no class weights, V and row strides
divisible by 16, rows of at most ``MAX_SMEM_BYTES`` (about 80K bf16 classes). Everything else,
and every GPU that is not a Hopper, takes the portable kernel. This path is compile-checked for
sm_90 in CI (triton 3.6 and the installed one) but has NOT yet run on a GPU: the CUDA tests
exercise it on a Hopper machine (test_cuda_gluon_smem_path_matches_float64).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .options import LossOptions

# Global -> shared asynchronous copy (cp.async): renamed from triton 3.6 to 3.7+.
_async_copy_to_smem = (
    getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
)

# Shared memory a row may take: leaves room for two resident programs per SM on an H100/H200
# (228 KB of shared memory per SM) when rows are short.
MAX_SMEM_BYTES = 160 * 1024


@gluon.jit
def _cross_entropy_smem_kernel(
    logits_ptr,
    stride_logits,
    grad_ptr,
    stride_grad,
    target_ptr,
    stride_target,
    loss_ptr,
    lse_ptr,
    coef_ptr,
    scale_ptr,
    V,
    ignore_index,
    label_smoothing,
    HAS_SMOOTHING: gl.constexpr,
    WRITE_GRAD: gl.constexpr,
    TILE: gl.constexpr,
    NUM_TILES: gl.constexpr,
    VEC: gl.constexpr,
):
    # One distributed layout for the copies and the reads back: each thread reads exactly the
    # elements it copied itself, so waiting for its own copies is enough.
    num_warps: gl.constexpr = gl.num_warps()  # the launch option; TILE = VEC * 32 * num_warps
    layout: gl.constexpr = gl.BlockedLayout([VEC], [32], [num_warps], [0])
    smem_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    smem = gl.allocate_shared_memory(logits_ptr.dtype.element_ty, [NUM_TILES * TILE], smem_layout)

    row = gl.program_id(0).to(gl.int64)
    row_ptr = logits_ptr + row * stride_logits  # int64: N * V may exceed 2**31
    offs = gl.arange(0, TILE, layout=layout)

    # The whole row in flight at once: what hides the memory latency.
    for t in gl.static_range(NUM_TILES):
        cols = gl.max_contiguous(gl.multiple_of(t * TILE + offs, VEC), VEC)
        _async_copy_to_smem(smem.slice(t * TILE, TILE), row_ptr + cols, mask=cols < V)
    async_copy.commit_group()
    async_copy.wait_group(0)

    # Sweep 1, from shared memory: running max and sum of exp (and the sum of x for smoothing).
    m = gl.max(gl.full([TILE], float("-inf"), gl.float32, layout), axis=0)
    s = gl.sum(gl.zeros([TILE], gl.float32, layout), axis=0)
    sum_x = gl.sum(gl.zeros([TILE], gl.float32, layout), axis=0)
    for t in gl.static_range(NUM_TILES):
        cols = t * TILE + offs
        ok = cols < V
        x = gl.where(ok, smem.slice(t * TILE, TILE).load(layout).to(gl.float32), float("-inf"))
        m_new = gl.maximum(m, gl.max(x, axis=0))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * gl.exp(m - m_safe) + gl.sum(gl.exp(x - m_safe), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            sum_x += gl.sum(gl.where(ok, x, 0.0), axis=0)
    lse = m + gl.log(s)

    y = gl.load(target_ptr + row * stride_target).to(gl.int64)
    valid = y != ignore_index
    y_ok = valid & (y >= 0) & (y < V)
    bad = valid != y_ok  # y_ok implies valid
    x_y = gl.load(row_ptr + gl.where(y_ok, y, 0)).to(gl.float32)
    hard = gl.where(y_ok, 1.0 - label_smoothing, 0.0)
    smooth = label_smoothing / V
    a = hard
    loss = hard * (lse - x_y)
    if HAS_SMOOTHING:
        a += smooth * V
        loss += smooth * (V * lse - sum_x)
    a = gl.where(valid, a, 0.0)
    loss = gl.where(valid, loss, 0.0)
    loss = gl.where(bad, float("nan"), loss)
    gl.store(loss_ptr + row, loss)
    gl.store(lse_ptr + row, lse)
    gl.store(coef_ptr + row, a)

    if WRITE_GRAD:
        # Sweep 2, from shared memory: grad = scale * (a * softmax(x) - b), one global write.
        scale = gl.load(scale_ptr)
        a_s = gl.where(bad, float("nan"), a * scale)
        hard_s = hard * scale
        smooth_s = gl.where(valid, smooth * scale, 0.0)
        grad_row = grad_ptr + row * stride_grad
        for t in gl.static_range(NUM_TILES):
            cols = t * TILE + offs
            ok = cols < V
            x = gl.where(ok, smem.slice(t * TILE, TILE).load(layout).to(gl.float32), float("-inf"))
            g = a_s * gl.exp(x - lse) - gl.where(cols == y, hard_s, 0.0)
            if HAS_SMOOTHING:
                g -= smooth_s
            g = gl.where(valid, g, 0.0)
            gl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


def smem_config(V: int, elem_size: int) -> tuple[int, int, int, int]:
    """(TILE, NUM_TILES, VEC, num_warps): 16-byte copies, 8 warps, tiles covering V."""
    vec = 16 // elem_size
    num_warps = 8
    tile = vec * 32 * num_warps
    return tile, triton.cdiv(V, tile), vec, num_warps


def supports(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    grad: torch.Tensor | None = None,
) -> bool:
    """Whether this experimental path takes the call (see the module doc for the scope).

    cp.async moves 16 bytes at a time: rows, strides and the class count must be 16-aligned
    (Triton specialises integers divisible by 16, which is what lets it prove that).
    """
    if not logits.is_cuda or weight is not None or target.dim() != 1:
        return False
    if torch.cuda.get_device_capability(logits.device)[0] != 9:
        return False
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    V = logits.shape[1]
    tensors = (logits,) if grad is None else (logits, grad)
    if V % 16 or any(t.stride(0) % 16 or t.data_ptr() % 16 for t in tensors):
        return False
    tile, num_tiles, _, _ = smem_config(V, logits.element_size())
    return tile * num_tiles * logits.element_size() <= MAX_SMEM_BYTES


def run_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    stats: torch.Tensor,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    grad_only: bool = False,
) -> None:
    """The row contract of ``core.run_rows`` for what ``supports`` accepts: class indices, no
    class weights, a scalar gradient scale, forward (loss and optional gradient) only."""
    M, V = logits.shape
    if M == 0:
        return
    assert not grad_only and (scale is None or scale.dim() == 0), "checked by takes()"
    tile, num_tiles, vec, num_warps = smem_config(V, logits.element_size())
    write_grad = grad is not None
    _cross_entropy_smem_kernel[(M,)](
        logits,
        logits.stride(0),
        grad if write_grad else stats,
        grad.stride(0) if write_grad else 0,
        target,
        target.stride(0),
        stats[0],
        stats[1],
        stats[2],
        scale if write_grad else stats,
        V,
        opts.ignore_index,
        opts.label_smoothing,
        HAS_SMOOTHING=opts.label_smoothing > 0.0,
        WRITE_GRAD=write_grad,
        TILE=tile,
        NUM_TILES=num_tiles,
        VEC=vec,
        num_warps=num_warps,
    )
