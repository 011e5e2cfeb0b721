"""The Inductor-compiled CPU row contract (``fusedce.backends.cpu_compiled``): large plain CPU calls
(class indices, no weights / smoothing / extras) on the torch backend. Checked against the
float64 reference and against the eager torch ops it replaces, over the shapes that break row
kernels, every dtype it takes, the reductions, ignored and out-of-range classes, in place."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedce
from ce_reference import check, make_logits, make_target
from fusedce.backends import cpu_compiled

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def compiled(monkeypatch):
    """Every CPU block of >= 2 rows and >= 2 classes on the compiled path (the size threshold
    is a speed choice, not a correctness one); yields a function returning the blocks handled."""
    monkeypatch.setattr(cpu_compiled, "MIN_BLOCK_LOGITS", 0)
    cpu_compiled.set_cpu_compile(True)
    with fusedce.use_backend("torch"):
        probe = make_logits((4, 8), torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fusedce.cross_entropy(probe, make_target((4, 8), "index"))
        if not cpu_compiled.cpu_compile_enabled():  # e.g. an image without a C++ compiler
            cpu_compiled.set_cpu_compile(True)
            pytest.skip("Inductor cannot compile C++ here (the fallback has its own test)")
        start = cpu_compiled.compiled_calls()
        yield lambda: cpu_compiled.compiled_calls() - start
    cpu_compiled.set_cpu_compile(True)


def _eager_ops(fn):
    """Runs ``fn`` with the compiled path off: the eager torch ops of the same row contract."""
    cpu_compiled.set_cpu_compile(False)
    try:
        return fn()
    finally:
        cpu_compiled.set_cpu_compile(True)


# (2, 2): the smallest block the path takes (V = 2); (3, 5): odd sizes; (4, 16411): a prime
# row length above every vector width; (300, 1000): several row blocks with a short last one;
# (3, 7, 4): K-dim input (the class dimension is not the last one); (2, 3000, 2): K-dim with
# many classes.
SHAPES = [(2, 2), (3, 5), (4, 16411), (300, 1000), (3, 7, 4), (2, 3000, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64(compiled, shape, dtype, reduction):
    x = make_logits(shape, dtype)
    t = make_target(shape, "index", ignore_frac=0.2)
    check(x, t, reduction=reduction)
    assert compiled() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_numbers_as_the_eager_ops(compiled, dtype):
    """Loss, gradient and the per-row loss of reduction='none' agree with the eager path to the
    last bits the dtype holds."""
    x = make_logits((64, 2048), dtype)
    t = make_target((64, 2048), "index", ignore_frac=0.1)

    def run():
        xr = x.detach().clone().requires_grad_()
        loss = fusedce.cross_entropy(xr, t, reduction="none")
        go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3))
        (g,) = torch.autograd.grad(loss, xr, go)
        return loss, g

    loss, g = run()
    assert compiled() > 0
    loss_e, g_e = _eager_ops(run)
    torch.testing.assert_close(loss, loss_e, rtol=2e-6, atol=2e-6)
    # A few float32 ulps apart (two exp implementations), then one rounding to the dtype.
    tol = {torch.float32: 4e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(g, g_e, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unit_stride_rows_of_a_wider_tensor(compiled, dtype):
    """Rows with a stride larger than V (a slice of the class dimension) are read in place."""
    wide = make_logits((40, 1200), dtype)
    x = wide[:, :1000]
    assert not x.is_contiguous()
    check(x, make_target((40, 1000), "index"))
    assert compiled() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(compiled, dtype):
    x = make_logits((50, 999), dtype)
    t = make_target((50, 999), "index", ignore_frac=0.2)
    ref = x.double().requires_grad_()
    F.cross_entropy(ref, t).backward()
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, as the output of a last layer: its buffer is overwritten
    loss = fusedce.cross_entropy(logits, t, inplace_backward=True)
    loss.backward()
    assert compiled() > 0
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), t), rtol=1e-5, atol=1e-6)
    err = (leaf.grad.double() - ref.grad).norm() / ref.grad.norm()
    assert err < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def test_ignored_rows_with_nan_logits_get_zero_gradient(compiled):
    x = make_logits((8, 500), torch.float32)
    t = make_target((8, 500), "index")
    t[2] = -100
    x[2, 7] = float("nan")
    xr = x.requires_grad_()
    loss = fusedce.cross_entropy(xr, t)
    loss.backward()
    assert compiled() > 0
    assert torch.isfinite(loss)
    assert torch.equal(xr.grad[2], torch.zeros(500))
    keep = torch.arange(8) != 2
    torch.testing.assert_close(
        loss.double(), F.cross_entropy(x.detach()[keep].double(), t[keep]), rtol=1e-6, atol=1e-6
    )


def test_unchecked_out_of_range_class_is_nan(compiled):
    """With the index check off, a bad class gives NaN (loss row and gradient row), never a
    read out of bounds; other rows keep their numbers."""
    x = make_logits((6, 400), torch.float32).requires_grad_()
    t = make_target((6, 400), "index")
    t[1] = 400
    t[4] = -3
    fusedce.set_target_check(False)
    try:
        loss = fusedce.cross_entropy(x, t, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x)
    finally:
        fusedce.set_target_check(True)
    assert compiled() > 0
    bad = torch.tensor([False, True, False, False, True, False])
    assert torch.isnan(loss[bad]).all() and torch.isnan(g[bad]).all()
    ref = F.cross_entropy(x.detach()[~bad].double(), t[~bad], reduction="none")
    torch.testing.assert_close(loss[~bad].double(), ref, rtol=1e-6, atol=1e-6)


def test_checked_out_of_range_class_raises(compiled):
    x = make_logits((6, 400), torch.float32)
    t = make_target((6, 400), "index")
    t[3] = 1000
    with pytest.raises(IndexError, match="1000"):
        fusedce.cross_entropy(x, t)


def test_loss_only_under_no_grad(compiled):
    x = make_logits((64, 1500), torch.bfloat16)
    t = make_target((64, 1500), "index", ignore_frac=0.1)
    with torch.no_grad():
        loss = fusedce.cross_entropy(x, t, reduction="sum")
    assert compiled() > 0
    torch.testing.assert_close(
        loss.double(), F.cross_entropy(x.double(), t, reduction="sum"), rtol=1e-5, atol=1e-4
    )


def test_large_call_takes_the_path_without_lowering_the_threshold():
    """The default threshold: a 64 x 2048 call is compiled, a 4 x 100 one is not."""
    cpu_compiled.set_cpu_compile(True)
    with fusedce.use_backend("torch"):
        before = cpu_compiled.compiled_calls()
        check(make_logits((4, 100), torch.float32), make_target((4, 100), "index"))
        assert cpu_compiled.compiled_calls() == before
        check(make_logits((64, 2048), torch.float32), make_target((64, 2048), "index"))
        assert cpu_compiled.compiled_calls() > before


def test_options_outside_the_plain_call_use_the_eager_ops(compiled):
    """Class weights, smoothing, probabilities and the extras keep their own (eager) path."""
    x = make_logits((64, 1024), torch.float32)
    t = make_target((64, 1024), "index")
    w = torch.rand(1024, generator=torch.Generator().manual_seed(5))
    check(x, t, weight=w)
    check(x, t, label_smoothing=0.1)
    check(x, make_target((64, 1024), "soft"))
    fusedce.cross_entropy(x, t, z_loss=1e-4)
    assert compiled() == 0


class _FailingCalls:
    """Wraps ``cpu_compiled._compiled_fn``: its next ``n`` compiled functions raise ``error``."""

    def __init__(self, monkeypatch, error, n):
        self.real, self.error, self.left, self.calls = cpu_compiled._compiled_fn, error, n, 0
        monkeypatch.setattr(cpu_compiled, "_compiled_fn", self)

    def __call__(self, kind, dtype):
        self.calls += 1
        if self.left == 0:
            return self.real(kind, dtype)
        self.left -= 1

        def failing(*args):
            raise self.error

        return failing


def _forward_backward(x, t):
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t)
    loss.backward()
    return loss.detach(), xr.grad


def test_one_failed_call_keeps_the_path_on(compiled, monkeypatch):
    """A call whose compiled function fails runs the eager ops (right numbers, one warning per
    kind of error); the next calls take the compiled path again."""
    x = make_logits((64, 512), torch.float32)
    t = make_target((64, 512), "index", ignore_frac=0.1)
    ref = _forward_backward(x, t)
    assert compiled() > 0
    failing = _FailingCalls(monkeypatch, RuntimeError("one bad call"), n=2)
    before = compiled()
    with pytest.warns(RuntimeWarning, match="later calls try the compiled rows again") as caught:
        loss, grad = _forward_backward(x, t)
    assert compiled() == before  # the eager ops took it
    assert cpu_compiled.cpu_compile_enabled()
    torch.testing.assert_close(loss, ref[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, ref[1], rtol=4e-6, atol=4e-9)
    assert sum("one bad call" in str(w.message) for w in caught) == 1
    # The same kind of failure again: the eager ops, no second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss, _ = _forward_backward(x, t)
    assert compiled() == before
    torch.testing.assert_close(loss, ref[0], rtol=2e-6, atol=2e-6)
    # Then the compiled path again, with the same numbers.
    loss, grad = _forward_backward(x, t)
    assert compiled() > before and failing.left == 0
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(grad, ref[1])


@pytest.mark.parametrize("cause", ["no compiler", "build error"])
def test_failure_on_every_call_turns_the_path_off(compiled, monkeypatch, cause):
    """No working C++ compiler (or a C++ build error, which recurs on every compile): one
    warning says the path is off for the process; later calls do not try again until
    ``set_cpu_compile(True)``."""
    from torch._inductor import exc

    root = exc.InvalidCxxCompiler() if cause == "no compiler" else exc.CppCompileError(["c++"], "")
    try:  # as Inductor raises it: wrapped
        raise RuntimeError("compiling failed") from root
    except RuntimeError as err:
        error = err
    failing = _FailingCalls(monkeypatch, error, n=1)
    x = make_logits((64, 512), torch.float32)
    t = make_target((64, 512), "index")
    with pytest.warns(RuntimeWarning, match="for the rest of the process"):
        check(x, t)
    assert not cpu_compiled.cpu_compile_enabled()
    attempts, before = failing.calls, compiled()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check(x, t)
    assert failing.calls == attempts and compiled() == before  # not tried again
    cpu_compiled.set_cpu_compile(True)
    check(x, t)
    assert compiled() > before


def test_switched_off_by_environment_variable():
    code = "import fusedce.backends.cpu_compiled as c; print(c.cpu_compile_enabled())"
    env = dict(os.environ, FUSEDCE_CPU_COMPILE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_compile_failure_falls_back_with_one_warning():
    """A machine without a working C++ compiler (here: CXX=/bin/false and an empty Inductor
    cache) gets one RuntimeWarning and the right numbers from the eager ops."""
    code = textwrap.dedent(
        """
        import warnings, torch, torch.nn.functional as F, fusedce
        from fusedce.backends import cpu_compiled
        x = torch.randn(64, 2048, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 2048, (64,), generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fusedce.use_backend("torch"):
                for _ in range(2):
                    xr = x.clone().requires_grad_()
                    loss = fusedce.cross_entropy(xr, y)
                    loss.backward()
        msg = "compiling the CPU cross-entropy rows failed"
        ours = [w for w in caught if msg in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert not cpu_compiled.cpu_compile_enabled()
        assert cpu_compiled.compiled_calls() == 0
        ref = x.double().requires_grad_()
        F.cross_entropy(ref, y).backward()
        torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), y))
        torch.testing.assert_close(xr.grad.double(), ref.grad, rtol=1e-5, atol=1e-8)
        print("fallback ok")
        """
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CXX="/bin/false", TORCHINDUCTOR_CACHE_DIR=cache)
        env.pop("FUSEDCE_CPU_COMPILE", None)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback ok" in out.stdout


def test_compile_is_announced_once_and_the_cuda_notice_dropped(compiled, monkeypatch, caplog):
    """The first compiled call of a process logs that Inductor compiles (it can take half a
    minute); later calls do not. torch's "No CUDA runtime is found" (a CUDA build without a GPU
    logs it while Inductor builds the C++ code) is dropped inside the compiled call only."""
    monkeypatch.setattr(cpu_compiled, "_announced", False)
    caplog.set_level(logging.WARNING)
    with fusedce.use_backend("torch"):
        for _ in range(2):
            check(make_logits((64, 2048), torch.float32), make_target((64, 2048), "index"))
    assert compiled() > 0
    said = [r for r in caplog.records if "compiling the CPU loss" in r.getMessage()]
    assert len(said) == 1 and said[0].name == "fusedce.backends.cpu_compiled"
    caplog.clear()
    notice = logging.getLogger("torch.utils.cpp_extension")
    with cpu_compiled._no_cuda_notice():
        notice.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        notice.warning("another message")
    notice.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
    assert [r.getMessage() for r in caplog.records] == [
        "another message",
        "No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'",
    ]
