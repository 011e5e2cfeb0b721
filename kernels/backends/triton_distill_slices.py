"""The O(N V_r) passes of the vocabulary-parallel distillation (``sharded.distillation``) as
Triton kernels: the numbers of its torch slices, without their full (N, V_r) float32
temporaries (log q, log p, d, r, the gradient before its cast).

One program per row of this rank's slice x (N, V_r) of the student's logits (unit stride along
V_r), the columns in tiles of BLOCK_V (``triton_distill.launch_config``); every other rank's
part arrives as O(N) row numbers, exchanged by the caller between the launches:

* ``slice_stats`` (one sweep): the slice's running (max, sum of exp) of z = x / T, of the raw x
  (the cross-entropy at T != 1) and of a dense teacher's t / T. The sums are relative to the
  slice's own max; the caller rescales them to the global max (O(N)) before summing them.
* ``slice_sums`` (a dense teacher, one sweep): the slice's sums of d and r (``_terms``) given the
  global (m, log_sum) of student and teacher.
* ``slice_grad`` (one sweep): the slice's gradient rows in the logits' dtype, given the global
  statistics, the row constant c (G of a dense teacher, the tail's g_tail - G of a sparse one,
  0 for "renormalize"), the row factor f (the scale, 0 on rows not counted) and the local true
  class; a sparse teacher's columns of S held here are written again after a barrier with their
  own value (their ``at_s`` from the caller's O(N k) arithmetic), as in ``triton_distill``.

The global statistics arrive as one float32 tensor ``glob`` (S, 2, N): per statistic s (0: z,
then x where the cross-entropy needs its own, then the teacher's t / T) its max and log-sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..distillation.options import DistillOptions
from .triton_distill import _dense_sums, _row_sweep, _terms, launch_config


@triton.jit
def _slice_stats_kernel(
    x_ptr,
    stride_x,
    t_ptr,
    stride_t,
    out_ptr,
    N,
    V,
    n_stats,
    inv_t,
    RAW: tl.constexpr,
    DENSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row's local (max, sum of exp(. - max)) of z, [x], [t / T] into out (2, S, N); an
    empty row (V = 0) gives (-inf, 0)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    one = tl.arange(0, 1)
    t_row = t_ptr + row * stride_t
    m, s, m1, s1, mt, st = _row_sweep(x_row, t_row, V, inv_t, RAW, DENSE, BLOCK_V)
    # The maxima in out[0], the sums in out[1]: (S, N) each, statistic by statistic.
    tl.store(out_ptr + row + one, m)
    tl.store(out_ptr + n_stats * N + row + one, s)
    if RAW:
        tl.store(out_ptr + N + row + one, m1)
        tl.store(out_ptr + (n_stats + 1) * N + row + one, s1)
    if DENSE:
        # The teacher's statistic is the last one.
        tl.store(out_ptr + (n_stats - 1) * N + row + one, mt)
        tl.store(out_ptr + (2 * n_stats - 1) * N + row + one, st)


@triton.jit
def _slice_sums_kernel(
    x_ptr,
    stride_x,
    t_ptr,
    stride_t,
    glob_ptr,
    out_ptr,
    N,
    V,
    t_stat,
    inv_t,
    beta,
    DIV: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row's sums of d and r over the slice into out (2, N), from the global statistics of
    the student (statistic 0) and the teacher (statistic ``t_stat``) in glob (S, 2, N)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    one = tl.arange(0, 1)
    m = tl.load(glob_ptr + row + one)
    log_sum = tl.load(glob_ptr + N + row + one)
    mt = tl.load(glob_ptr + 2 * t_stat * N + row + one)
    log_sum_t = tl.load(glob_ptr + (2 * t_stat + 1) * N + row + one)
    t_row = t_ptr + row * stride_t
    D, G = _dense_sums(x_row, t_row, V, inv_t, m, log_sum, mt, log_sum_t, beta, DIV, BLOCK_V)
    tl.store(out_ptr + row + one, D)
    tl.store(out_ptr + N + row + one, G)


@triton.jit
def _slice_grad_kernel(
    x_ptr,
    stride_x,
    t_ptr,
    stride_t,
    glob_ptr,
    row_ptr,
    y_ptr,
    ids_ptr,
    at_ptr,
    grad_ptr,
    stride_g,
    N,
    V,
    K,
    t_stat,
    inv_t,
    beta,
    hard,
    DIV: tl.constexpr,
    SOFT: tl.constexpr,
    DENSE: tl.constexpr,
    HARD: tl.constexpr,
    HARD_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row of the slice's gradient: f ((1 - a) / T dD/dz + a (softmax(x) - [j = y])), from
    glob (S, 2, N), the row constants (c, f, counted) in row_ptr (3, N), the local true class y
    (-1: not here), and a sparse teacher's local ids (-1: not here) and ``at_s`` (N, K)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = grad_ptr + row * stride_g
    one = tl.arange(0, 1)
    m = tl.load(glob_ptr + row + one)
    log_sum = tl.load(glob_ptr + N + row + one)
    if HARD_STATS:
        m1 = tl.load(glob_ptr + 2 * N + row + one)
        log_sum1 = tl.load(glob_ptr + 3 * N + row + one)
    else:
        m1 = m
        log_sum1 = log_sum
    c = tl.load(row_ptr + row + one)
    f = tl.load(row_ptr + N + row + one)
    # Rows not counted get 0, not f * g: g may be NaN there (an ignored row of -inf logits).
    keep = tl.load(row_ptr + 2 * N + row + one) != 0.0
    fd = f * ((1.0 - hard) * inv_t)
    fh = f * hard
    y = -1
    if HARD:
        y = tl.load(y_ptr + row)
    if SOFT and DENSE:
        mt = tl.load(glob_ptr + 2 * t_stat * N + row + one)
        log_sum_t = tl.load(glob_ptr + (2 * t_stat + 1) * N + row + one)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        q = tl.exp((x * inv_t - m) - log_sum)
        g = tl.zeros([BLOCK_V], tl.float32)
        if SOFT:
            if DENSE:
                t = tl.load(t_ptr + row * stride_t + cols, mask=ok, other=float("-inf"))
                logq = (x * inv_t - m) - log_sum
                logp = (t.to(tl.float32) * inv_t - mt) - log_sum_t
                _d, r = _terms(logp, logq, beta, DIV)
                g = fd * (r - q * c)
            else:
                g = fd * (q * c)
        if HARD:
            q1 = tl.exp((x - m1) - log_sum1)
            g += fh * (q1 - tl.where(cols == y, 1.0, 0.0))
        g = tl.where(keep, g, 0.0)
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)
    if SOFT and not DENSE:
        # The columns of S held here again, with their own value (after every thread's store;
        # the ids of a row are distinct, so no two lanes write one column).
        tl.debug_barrier()
        offs = tl.arange(0, BLOCK_K)
        kin = offs < K
        ids = tl.load(ids_ptr + row * K + offs, mask=kin, other=-1)
        own = kin & (ids >= 0)
        x_s = tl.load(x_row + ids, mask=own, other=0.0).to(tl.float32)
        at_s = tl.load(at_ptr + row * K + offs, mask=own, other=0.0)
        q_s = tl.exp((x_s * inv_t - m) - log_sum)
        g_s = fd * (q_s * c + at_s)
        if HARD:
            g_s += fh * (tl.exp((x_s - m1) - log_sum1) - tl.where(ids == y, 1.0, 0.0))
        g_s = tl.where(keep, g_s, 0.0)
        tl.store(g_row + ids, g_s.to(grad_ptr.dtype.element_ty), mask=own)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (the kernels' layout)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def slice_stats(
    x: torch.Tensor, teacher_logits: torch.Tensor | None, temperature: float, raw: bool
) -> torch.Tensor:
    """The slice's local (max, sum of exp(. - max)) per row of each statistic: z = x / T, the
    raw x where ``raw`` (the cross-entropy at T != 1), the teacher's t / T where given.

    Args:
        x: (N, V_r) this rank's slice of the student's logits.
        teacher_logits: (N, V_r) the dense teacher's slice, or None.
        temperature: T.
        raw: whether the raw logits' statistic is wanted.

    Returns:
        (2, S, N) float32: the maxima (-inf on an empty slice), then the sums (0 there).
    """
    N, V = x.shape
    n_stats = 1 + int(raw) + int(teacher_logits is not None)
    out = torch.empty(2, n_stats, N, dtype=torch.float32, device=x.device)
    if not V:
        # A rank may hold no class: nothing to sweep (and no memory to point at).
        out[0].fill_(float("-inf"))
        out[1].zero_()
        return out
    if N == 0:
        return out
    x = _unit_stride(x)
    t = _unit_stride(teacher_logits) if teacher_logits is not None else x
    block_v, _, warps = launch_config(V, 1)
    _slice_stats_kernel[(N,)](
        x,
        x.stride(0),
        t,
        t.stride(0),
        out,
        N,
        V,
        n_stats,
        1.0 / temperature,
        RAW=raw,
        DENSE=teacher_logits is not None,
        BLOCK_V=block_v,
        num_warps=warps,
    )
    return out


def slice_sums(
    x: torch.Tensor, teacher_logits: torch.Tensor, glob: torch.Tensor, opts: DistillOptions
) -> torch.Tensor:
    """The slice's sums of d and r of a dense teacher (``torch_distill.terms``).

    Args:
        x: (N, V_r) the student's slice.
        teacher_logits: (N, V_r) the teacher's slice.
        glob: (S, 2, N) float32 global (max, log_sum) per statistic, the teacher's last.
        opts: the divergence, beta and temperature.

    Returns:
        (2, N) float32: sum d, sum r over the slice (0 on an empty slice).
    """
    N, V = x.shape
    out = torch.zeros(2, N, dtype=torch.float32, device=x.device)
    if not V or N == 0:
        return out
    x, t = _unit_stride(x), _unit_stride(teacher_logits)
    block_v, _, warps = launch_config(V, 1)
    _slice_sums_kernel[(N,)](
        x,
        x.stride(0),
        t,
        t.stride(0),
        glob,
        out,
        N,
        V,
        glob.shape[0] - 1,
        1.0 / opts.temperature,
        opts.beta,
        DIV=opts.code,
        BLOCK_V=block_v,
        num_warps=warps,
    )
    return out


def slice_grad(
    x: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    glob: torch.Tensor,
    row_consts: torch.Tensor,
    y_local: torch.Tensor | None,
    sparse: tuple[torch.Tensor, torch.Tensor] | None,
    opts: DistillOptions,
) -> torch.Tensor:
    """The slice's gradient rows, scaled, in the dtype of ``x``.

    Args:
        x: (N, V_r) the student's slice.
        teacher_logits: (N, V_r) a dense teacher's slice (the divergence's part reads it), or
            None.
        glob: (S, 2, N) float32 global (max, log_sum): z, then x if the cross-entropy needs
            its own (T != 1), then a dense teacher's.
        row_consts: (3, N) float32: c (G dense, g_tail - G sparse "bin", 0 "renormalize"),
            the row factor f, and 1 on the rows counted (0 elsewhere: their gradient is 0).
        y_local: (N,) int64 local true class (-1 where another rank holds it or the row is
            ignored), or None without the cross-entropy part.
        sparse: a sparse teacher's ((N, k) int64 local ids, -1 where not held here; (N, k)
            float32 ``at_s`` of ``torch_distill.sparse_terms``), or None.
        opts: the options (divergence, beta, temperature, hard weight).

    Returns:
        (N, V_r) gradient in the dtype of ``x``.
    """
    N, V = x.shape
    grad = torch.empty(N, V, dtype=x.dtype, device=x.device)
    if not V or N == 0:
        return grad
    x = _unit_stride(x)
    a, T = opts.hard_weight, opts.temperature
    soft = a < 1.0
    dense = soft and teacher_logits is not None
    hard = y_local is not None
    t = _unit_stride(teacher_logits) if dense else x
    # Arguments a specialisation does not read still get their declared dtypes (int64 ids and
    # classes, float32 at_s): one compiled kernel per specialisation, as the sm_90 test builds.
    no_index = torch.empty((1,), dtype=torch.int64, device=x.device)
    no_at = torch.empty((1,), dtype=torch.float32, device=x.device)
    ids, at_s = sparse if soft and not dense else (no_index, no_at)
    K = ids.shape[1] if soft and not dense else 1
    block_v, block_k, warps = launch_config(V, K)
    _slice_grad_kernel[(N,)](
        x,
        x.stride(0),
        t,
        t.stride(0),
        glob,
        row_consts,
        y_local if hard else no_index,
        ids,
        at_s,
        grad,
        grad.stride(0),
        N,
        V,
        K,
        glob.shape[0] - 1,
        1.0 / T,
        opts.beta,
        a,
        DIV=opts.code,
        SOFT=soft,
        DENSE=dense,
        HARD=hard,
        HARD_STATS=hard and T != 1.0,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return grad
