"""fusedce's kernels on a real GPU, against torch in float64: the Triton cross-entropy kernel and
the chunked linear + cross-entropy.

Marker ``gpu``: skipped automatically where CUDA is absent (tests/conftest.py). The CPU suites
(tests/test_cross_entropy.py, tests/test_linear_cross_entropy.py)
cover the options in depth on small shapes; this file covers what only a GPU shows: LLM-sized
vocabularies, memory, host syncs, 64-bit offsets, torch.compile with Inductor.
"""

from __future__ import annotations

import pytest
import torch

import fusedce
from ce_reference import (
    DTYPES,
    check,
    linear_reference,
    make_linear_case,
    make_logits,
    make_target,
    rel_err,
)

pytestmark = pytest.mark.gpu
DEV = "cuda"
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# Cross-entropy: the Triton kernel
# --------------------------------------------------------------------------------------------


# V, from small to large:
# - 1, 2, 3: degenerate class counts (one class: zero loss and gradient), many rows per program;
# - 1000: one tile, not a power of two (masked tail);
# - 8192 / 8193: the largest float32 row held in registers as one tile / one past it (tiled loop);
# - 16384 / 16411: the same for 16-bit dtypes / a prime past it (ragged last tile);
# - 32000, 50257, 128256, 256000: the LLM vocabularies the benchmarks use (several tiles, ragged
#   last tile for 50257).
# N = 37 is odd and not a multiple of the rows per program; 9 rows keep the float64 reference of
# the two largest vocabularies small.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "V", [1, 2, 3, 1000, 8192, 8193, 16384, 16411, 32000, 50257, 128256, 256000]
)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_cuda_matches_float64(V, dtype, kind):
    N = 37 if V <= 50257 else 9
    x = make_logits((N, V), dtype, device=DEV)
    target = make_target((N, V), kind, ignore_frac=0.2 if kind == "hard" else 0.0)
    check(x, target, reduction="none", label_smoothing=0.1, weight=torch.rand(V) + 0.5)
    check(x, target, reduction="mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_k_dim_and_non_contiguous(dtype):
    # (N, C, d1, d2) logits with an odd C = 301: the class dimension is not the last one.
    x = make_logits((4, 301, 3, 7), dtype, device=DEV)
    check(x, make_target((4, 301, 3, 7), "hard", ignore_frac=0.2), label_smoothing=0.2)
    # Every third row of a wider tensor, from column 7: row stride != V, unaligned row starts,
    # unit column stride (the kernel's strided path without a copy).
    y = make_logits((64, 40000), dtype, device=DEV)[::3, 7:32007]
    check(y, make_target(tuple(y.shape), "hard"), reduction="sum")
    # A transpose: column stride != 1, which the wrapper must copy before the kernel.
    z = make_logits((500, 33), dtype, device=DEV).t()
    check(z, make_target(tuple(z.shape), "soft"), reduction="none")


def test_cuda_empty_and_single_row():
    # N = 0 (no program launched; mean of nothing = 0) and N = 1, at an LLM vocabulary.
    check(make_logits((0, 32000), torch.bfloat16, device=DEV), make_target((0, 32000), "hard"))
    check(make_logits((1, 32000), torch.bfloat16, device=DEV), make_target((1, 32000), "hard"))


def test_cuda_int64_offsets():
    """N * V > 2**31 elements: row offsets must be 64-bit or the last rows read garbage."""
    # The smallest N at Llama 3's V = 128256 whose last rows start past element 2**31.
    V = 128256
    N = (2**31) // V + 8
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * N * V * 2:
        pytest.skip("not enough GPU memory for a > 2**31-element bf16 tensor plus its gradient")
    x = torch.randn((N, V), device=DEV, dtype=torch.bfloat16)
    target = torch.randint(0, V, (N,), device=DEV)
    x.requires_grad_()
    loss = fusedce.cross_entropy(x, target, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    tail = slice(N - 4, N)  # rows whose offsets exceed 2**31
    ref = torch.nn.functional.cross_entropy(x[tail].double(), target[tail], reduction="none")
    torch.testing.assert_close(loss[tail].double(), ref, rtol=1e-5, atol=1e-5)
    p = torch.softmax(x[tail].double(), 1)
    p[torch.arange(4), target[tail]] -= 1
    assert (g[tail].double() - p).norm() <= 1e-2 * p.norm()


def test_cuda_memory_out_of_place_vs_inplace():
    """Peak extra memory of backward through the loss into the layer before it: about 1x the
    logits out of place (the gradient buffer), about 0 with inplace_backward."""
    # 4096 x 32000 bf16 = 250 MiB of logits: large enough that the small buffers (loss rows,
    # index-check count, the layer's own gradients) stay far below the 10 % margin. The logits
    # come from a thin matmul, as from a model's head: its backward consumes the logits'
    # gradient without keeping it (backward(inputs=[logits]) would store a copy in .grad).
    N, D, V = 4096, 16, 32000
    target = torch.randint(0, V, (N,), device=DEV)
    logits_bytes = N * V * 2
    for inplace, limit in ((False, 1.1 * logits_bytes), (True, 0.1 * logits_bytes)):
        hidden = torch.randn(N, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        head = torch.randn(D, V, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        logits = hidden @ head
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fusedce.cross_entropy(logits, target, inplace_backward=inplace)
        loss.backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra <= limit, (inplace, extra / logits_bytes)
        del hidden, head, logits, loss


@pytest.mark.parametrize("check", [True, False])
def test_cuda_forward_never_syncs(check):
    """No host sync in forward with a gradient, with the index check on (its count goes to
    pinned memory and is read in backward) or off; with it off, none in backward either."""
    # A small batch at an LLM vocabulary: the sync question does not depend on the size.
    x = make_logits((64, 32000), torch.bfloat16, device=DEV).requires_grad_()
    target = torch.randint(0, 32000, (64,), device=DEV)
    fusedce.cross_entropy(x, target).backward()  # warm-up: compile outside the sync check
    torch.cuda.synchronize()
    fusedce.set_target_check(check)
    try:
        for reduction in ("mean", "sum", "none"):
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss = fusedce.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
                loss = loss.sum() if reduction == "none" else loss
                if not check:
                    loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if check:
                loss.backward()
    finally:
        fusedce.set_target_check(True)


def test_cuda_bad_index_raises_and_never_reads_out_of_bounds():
    # 8 rows of 1000 classes, the last index 5000: far enough out that a missing bound check
    # reads past the row (and past the tensor, for the last row).
    x = make_logits((8, 1000), torch.float32, device=DEV).requires_grad_()
    bad = torch.tensor([0, 1, 2, 3, 4, 5, 6, 5000], device=DEV)
    with pytest.raises(IndexError, match="5000 is out of bounds"):  # no gradient: at the call
        fusedce.cross_entropy(x.detach(), bad)
    loss = fusedce.cross_entropy(x, bad)  # with a gradient: NaN now, the error in backward
    assert torch.isnan(loss)
    with pytest.raises(IndexError, match="5000 is out of bounds"):
        loss.backward()
    fusedce.set_target_check(False)
    try:
        loss = fusedce.cross_entropy(x, bad, reduction="none")
        torch.cuda.synchronize()  # an illegal access would surface here
        assert torch.isnan(loss[7]) and torch.isfinite(loss[:7]).all()
    finally:
        fusedce.set_target_check(True)


def test_cuda_bad_index_still_on_its_way_raises_later_without_a_sync():
    """backward() never waits for the count: one not yet on the host is read by a later call."""
    x = make_logits((8, 1000), torch.float32, device=DEV).requires_grad_()
    good = torch.randint(0, 1000, (8,), device=DEV)
    bad = good.clone()
    bad[3] = -7
    fusedce.cross_entropy(x, good).backward()  # warm-up: compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # keeps the stream busy: the count cannot arrive yet
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fusedce.cross_entropy(x, bad)
        loss.backward()  # no wait, no error yet
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(IndexError, match=r"-7 is out of bounds.*earlier call"):
        fusedce.wait_target_check()
    fusedce.wait_target_check()  # read once: nothing left
    # Read by the next call once it has arrived.
    torch.cuda._sleep(200_000_000)
    fusedce.cross_entropy(x, bad).backward()
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=r"-7 is out of bounds.*earlier call"):
        fusedce.cross_entropy(x, good)


def test_cuda_index_errors_name_the_function_called():
    """The deferred check keeps the name of the call that counted it: the module's, in its
    backward and when a later call of another function reads it; the fused head's check (read
    at the call) names its caller too."""
    x = make_logits((8, 1000), torch.float32, device=DEV).requires_grad_()
    good = torch.randint(0, 1000, (8,), device=DEV)
    bad = good.clone()
    bad[2] = 1000
    module = fusedce.CrossEntropyLoss()
    loss = module(x, bad)
    torch.cuda.synchronize()  # the count has arrived: backward reads it
    with pytest.raises(IndexError, match=r"^CrossEntropyLoss: target class index 1000 is out"):
        loss.backward()
    torch.cuda._sleep(200_000_000)  # the count cannot arrive before backward
    module(x, bad).backward()
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=r"^CrossEntropyLoss: target class index 1000.*earlier"):
        fusedce.cross_entropy(x, good)
    h = torch.randn(8, 16, device=DEV, requires_grad=True)
    head = fusedce.LinearCrossEntropyLoss(16, 1000, device=DEV)
    with pytest.raises(IndexError, match=r"^LinearCrossEntropyLoss: target class index 1000"):
        head(h, bad)
    with pytest.raises(IndexError, match=r"^linear_cross_entropy: target class index 1000"):
        fusedce.linear_cross_entropy(h, head.linear.weight, bad)


def test_cuda_compile_inductor_fullgraph():
    # A GPT-2-sized head (V = 50257, ragged last tile) on 128 tokens: Inductor compiles the
    # matmul around the custom op; the comparison is with the same step run eagerly.
    torch._dynamo.reset()
    model = torch.nn.Linear(64, 50257, device=DEV, dtype=torch.bfloat16)
    h = torch.randn(128, 64, device=DEV, dtype=torch.bfloat16)
    target = torch.randint(0, 50257, (128,), device=DEV)

    def step(inp):
        return fusedce.cross_entropy(model(inp), target, label_smoothing=0.1)

    loss_c = torch.compile(step, fullgraph=True)(h)
    (gc,) = torch.autograd.grad(loss_c, model.weight)
    loss_e = step(h)
    (ge,) = torch.autograd.grad(loss_e, model.weight)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gc.float(), ge.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_compile_inductor_transposed_weight(reduction):
    # A tied embedding's weight E.t() (transposed strides) and a strided input: Inductor asserts
    # the strides of every custom op output against the fake kernel's.
    torch._dynamo.reset()
    E = (torch.randn(64, 1000, device=DEV) * 0.1).requires_grad_()  # (D, V): W = E.t()
    h = torch.randn(4, 32, 128, device=DEV)[..., ::2].requires_grad_()
    t = torch.randint(0, 1000, (4, 32), device=DEV)
    up = torch.randn(4, 32, device=DEV) if reduction == "none" else torch.tensor(1.3, device=DEV)

    def step(h, W):
        return fusedce.linear_cross_entropy(h, W, t, reduction=reduction, chunk_size=64)

    loss_c = torch.compile(step, fullgraph=True)(h, E.t())
    grads_c = torch.autograd.grad(loss_c, (h, E), up)
    loss_e = step(h, E.t())
    grads_e = torch.autograd.grad(loss_e, (h, E), up)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for a, e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5)


def test_cuda_custom_ops_take_any_strides():
    # The compiled Triton kernel reads unit-stride rows and contiguous weights: the ops lay
    # strided inputs out for it, so direct calls give the numbers of contiguous inputs.
    V = 1000
    x = torch.randn(6, 2 * V, device=DEV)[:, ::2]
    t = torch.randint(0, V, (6,), device=DEV)
    t[1] = -100
    w = torch.rand(2 * V, device=DEV)[::2] + 0.5
    tw = torch.rand(12, device=DEV)[::2]
    op = torch.ops.fusedce.cross_entropy.default
    for reduction, grad_now in (("mean", True), ("none", False)):
        opts = (-100, 0.1, reduction, grad_now, 0.7, 5.0, 0.01)
        out = op(x, t, w, *opts, tw, True)
        ref = op(x.contiguous(), t, w.contiguous(), *opts, tw.contiguous(), True)
        for a, b in zip(out, ref, strict=True):
            torch.testing.assert_close(a, b)
    stats = op(x.contiguous(), t, w.contiguous(), -100, 0.1, "none", False)[2]
    factor = torch.randn(12, device=DEV)[::2]
    grad_op = torch.ops.fusedce.cross_entropy_grad.default
    out = grad_op(x, t, w, stats.t().contiguous().t(), factor, -100, 0.1)
    ref = grad_op(x.contiguous(), t, w.contiguous(), stats, factor.contiguous(), -100, 0.1)
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy: accuracy at an LLM-like shape and the peak-memory bound
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulation", ["float32", "input"])
def test_cuda_linear_accuracy_and_peak_memory(accumulation):
    # N=8192 tokens, D=1024, V=32000 in bf16: the full logits (500 MiB) are 8x one chunk of
    # 1024 rows (62.5 MiB), so the bound below tells a chunked run from one that materialises
    # them; the float64 reference (2 GiB of logits) still fits any data-centre GPU.
    N, D, V, chunk = 8192, 1024, 32000, 1024
    dev = torch.device(DEV)
    x, W, _, t = make_linear_case((N,), D, V, torch.bfloat16, ignore_frac=0.05)
    x, W, t = x.to(dev).requires_grad_(), W.to(dev).requires_grad_(), t.to(dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fusedce.linear_cross_entropy(x, W, t, chunk_size=chunk, accumulation=accumulation)
    gx, gw = torch.autograd.grad(loss, (x, W))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    full_logits = N * V * 2
    grads = (N * D + V * D) * 2
    acc = V * D * 4 if accumulation == "float32" else 0
    bound = chunk * V * 2 + grads + acc + 64 * MiB  # slack: cuBLAS workspace, loss rows
    assert peak <= bound, (peak / MiB, bound / MiB)
    assert peak < full_logits, (peak / MiB, full_logits / MiB)

    ref, (x64, W64) = linear_reference(x, W, None, t)
    rx, rw = torch.autograd.grad(ref, (x64, W64))
    assert abs(float(loss) - float(ref)) <= 1e-2 * abs(float(ref))
    assert rel_err(gx, rx) < 2e-2
    assert rel_err(gw, rw) < 2e-2
