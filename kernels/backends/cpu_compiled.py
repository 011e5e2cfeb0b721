"""The plain row contract compiled by TorchInductor's C++ backend, for large CPU row blocks.

Eager torch ops make one pass over the block per op (upcast, max, exp, sum, subtract, scale,
downcast); Inductor fuses them into one loop per row that reads the logits from cache and
writes the gradient once, vectorised. It covers the common call: class indices with no class
weights, smoothing or extras, float32 / bfloat16 / float16 logits. Everything else takes the
eager ops of ``torch_ops`` with the same numbers.

A call whose compiled function fails runs the eager ops instead (one ``RuntimeWarning`` per kind
of error), and later calls try the compiled function again. Only a failure that will recur on
every call on this machine -- no working C++ compiler, a C++ build error, ``torch.compile``
unsupported on this Python -- turns the path off for the rest of the process (saying so in its
warning; ``set_cpu_compile(True)`` tries again).

The functions are compiled with dynamic shapes: the first large call of each kind (loss, gradient)
and dtype pays a compile of 15-35 s with a cold Inductor cache on a 2-core CPU (logged once per
process), later shapes reuse it (Inductor caches the code on disk, so a new process pays far
less). ``FUSEDCE_CPU_COMPILE=0`` in the environment, or
``set_cpu_compile(False)``, turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

# Below this many logits in a row block the eager ops are as fast as the call into the
# compiled code (its guards and wrapper cost tens of microseconds); smaller plain calls on the
# default backend go to F.cross_entropy anyway (small_calls.SMALL_CPU_ELEMENTS).
MIN_BLOCK_LOGITS = 1 << 15
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_enabled = os.environ.get("FUSEDCE_CPU_COMPILE", "1").strip() != "0"
_unavailable = False  # a failure that recurs on every call here turned the path off
_warned: set[str] = set()  # the kinds of failure already reported
_compiled: dict[tuple[object, torch.dtype], Callable[..., object]] = {}
_calls = 0  # row blocks the compiled functions handled in this process
_announced = False  # the compile was logged


def set_cpu_compile(enabled: bool) -> None:
    """Turns the Inductor-compiled CPU path on or off (default on; ``FUSEDCE_CPU_COMPILE=0``).

    Off, large CPU calls use eager torch ops: same results, slower. Turning it on also retries
    after a failure that had turned it off for the process (and reports failures again).
    """
    global _enabled, _unavailable
    _enabled = bool(enabled)
    _unavailable = False
    _warned.clear()


def cpu_compile_enabled() -> bool:
    """Whether large plain CPU calls go through the compiled row function (on, and not turned
    off by a failure that recurs on every call on this machine)."""
    return _enabled and not _unavailable


def compiled_calls() -> int:
    """How many row blocks the compiled functions have handled in this process."""
    return _calls


def _rows(x: Tensor, y: Tensor, ignore_index: int, scale: Tensor | None):
    """Per-row loss, max and log-sum (float32, (M,) each; see ``core``) and, with ``scale``,
    the gradient scale * (softmax - onehot(y)) in the logits' dtype: 0 on ignored rows (also
    with NaN logits), NaN on rows whose class is out of range (the loss too). Shift-exact: the
    loss is (m - x_y) + log_sum, never lse - x_y."""
    xf = x.float()
    m = xf.amax(1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    # One exp per logit, shared by the sum and the gradient (Inductor keeps e in cache).
    e = (xf - m).exp()
    s = e.sum(1, keepdim=True)
    log_sum = s.log()[:, 0]
    valid = y != ignore_index
    ok = valid & (y >= 0) & (y < x.shape[1])
    bad = valid & ~ok
    y_safe = torch.where(ok, y, 0)
    x_y = xf.gather(1, y_safe[:, None])[:, 0]
    loss = torch.where(valid, (m[:, 0] - x_y) + log_sum, 0.0)
    loss = torch.where(bad, float("nan"), loss)
    if scale is None:
        return loss, m[:, 0], log_sum, None
    cols = torch.arange(x.shape[1], device=x.device)[None, :]
    onehot = ((cols == y_safe[:, None]) & ok[:, None]).float()
    g = (e / s - onehot) * scale[:, None]
    g = torch.where(valid[:, None], g, 0.0)
    g = torch.where(bad[:, None], float("nan"), g)
    return loss, m[:, 0], log_sum, g.to(x.dtype)


def _rows_loss(x: Tensor, y: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    loss, m, log_sum, _ = _rows(x, y, ignore_index, None)
    return loss, m, log_sum


def _rows_grad(
    x: Tensor, y: Tensor, ignore_index: int, scale: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    loss, m, log_sum, g = _rows(x, y, ignore_index, scale)
    grad.copy_(g)
    return loss, m, log_sum


def _rows_grad_inplace(
    x: Tensor, y: Tensor, ignore_index: int, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    loss, m, log_sum, g = _rows(x, y, ignore_index, scale)
    x.copy_(g)
    return loss, m, log_sum


_FUNCTIONS = {"loss": _rows_loss, "grad": _rows_grad, "inplace": _rows_grad_inplace}


def compiled_copy(base: Callable[..., object], dtype: torch.dtype) -> Callable[..., object]:
    """``base`` compiled for one logits dtype (dynamic shapes, full graph), made once.

    Each (function, dtype) pair gets its own copy of the code object: TorchDynamo keeps its
    compiled variants (and its recompile limit) per code object, and the shape classes Inductor
    guards on times the dtypes would otherwise exceed that limit and fall back to uncompiled
    code. The log-probabilities' compiled rows (``cpu_compiled_log_probs``) take their copies
    here too.
    """
    key = (base, dtype)
    fn = _compiled.get(key)
    if fn is None:
        name = f"{base.__name__}_{str(dtype).removeprefix('torch.')}"
        copy = types.FunctionType(base.__code__.replace(co_name=name), base.__globals__, name)
        fn = torch.compile(copy, dynamic=True, fullgraph=True)
        _compiled[key] = fn
    return fn


def _compiled_fn(kind: str, dtype: torch.dtype) -> Callable[..., object]:
    """The compiled function for one kind of call (``_FUNCTIONS``) and one logits dtype."""
    return compiled_copy(_FUNCTIONS[kind], dtype)


def guarded_call(get_fn: Callable[[], Callable[..., object]], *args: object) -> tuple[bool, object]:
    """``get_fn()(*args)`` without autograd (one grad mode: Dynamo guards on it): (True, its
    result), or (False, None) where compiling or running it failed (reported by
    ``_report_failure``; the caller then runs the eager ops). Every compiled call of the CPU
    paths goes through here, so that one switch and one failure policy govern them all."""
    try:
        with torch.no_grad(), _no_cuda_notice():
            return True, get_fn()(*args)
    except Exception as err:
        _report_failure(err)
        return False, None


def applies(logits: Tensor) -> bool:
    """Whether this (M, V) block takes the compiled path (the caller checked the options)."""
    M, V = logits.shape
    return (
        _enabled
        and not _unavailable
        and logits.device.type == "cpu"
        and logits.dtype in _DTYPES
        and M >= 2
        and V >= 2
        and M * V >= MIN_BLOCK_LOGITS
        and not torch.compiler.is_compiling()
    )


def run_plain_rows(
    logits: Tensor,
    y: Tensor,
    ignore_index: int,
    grad: Tensor | None,
    scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Loss, max and log-sum per row (float32, (M,) each), writing ``grad`` when given.

    Args:
        logits: (M, V) CPU logits with unit stride along V.
        y: (M,) int64 class indices.
        ignore_index: the ignored class index.
        grad: (M, V) gradient output in the logits' dtype (may be ``logits`` itself), or None.
        scale: () or (M,) float32 gradient factors (with ``grad``).

    Returns:
        ``(loss, max, log_sum)``, or None when the compiled function failed on this call (the
        caller then runs the eager ops; see ``_report_failure``).
    """
    global _calls, _announced
    M = logits.shape[0]
    dt = logits.dtype
    if not _announced:
        _announced = True
        logging.getLogger(__name__).warning(
            "fusedce: compiling the CPU loss with TorchInductor (first large call of each kind "
            "and dtype; 15-35 s on a cold cache); FUSEDCE_CPU_COMPILE=0 skips it"
        )
    if grad is None:
        kind, args = "loss", (logits, y, ignore_index)
    else:
        s = torch.broadcast_to(scale.float(), (M,)).contiguous()
        in_place = grad.is_set_to(logits)
        kind = "inplace" if in_place else "grad"
        args = (logits, y, ignore_index, s) if in_place else (logits, y, ignore_index, s, grad)
    # The name is looked up at call time (tests wrap ``_compiled_fn`` to make calls fail).
    ok, out = guarded_call(lambda: _compiled_fn(kind, dt), *args)
    if not ok:
        return None
    _calls += 1
    return out


def _not_the_cuda_notice(record: logging.LogRecord) -> bool:
    """False for torch.utils.cpp_extension's "No CUDA runtime is found" (a CUDA build of torch
    without a GPU logs it while Inductor builds this CPU code: nothing to do with it)."""
    return not record.getMessage().startswith("No CUDA runtime")


@contextlib.contextmanager
def _no_cuda_notice():
    """`_not_the_cuda_notice` on torch's C++-extension logger while the block runs."""
    log = logging.getLogger("torch.utils.cpp_extension")
    log.addFilter(_not_the_cuda_notice)
    try:
        yield
    finally:
        log.removeFilter(_not_the_cuda_notice)


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _fails_on_every_call(err: BaseException) -> bool:
    """Whether compiling will fail the same way on every later call on this machine: no working
    C++ compiler, a C++ build error (a broken toolchain, missing headers: the function and its
    code are fixed, so a build that failed once fails again, seconds each time), or
    ``torch.compile`` unsupported on this Python."""
    try:
        from torch._inductor import exc as inductor_exc

        permanent: tuple[type[BaseException], ...] = (
            inductor_exc.InvalidCxxCompiler,
            inductor_exc.CppCompileError,
        )
    except ImportError:  # pragma: no cover - depends on the torch build
        permanent = ()
    if any(isinstance(e, permanent) for e in _exception_chain(err)):
        return True
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported

        return not is_dynamo_supported()
    except Exception:  # pragma: no cover - depends on the torch build
        return False


def _report_failure(err: Exception) -> None:
    """A failed compiled call: a warning once per kind of error; the path stays on for later
    calls unless the failure recurs on every call here (``_fails_on_every_call``)."""
    global _unavailable
    permanent = _fails_on_every_call(err)
    # The innermost cause names the kind (Inductor wraps its errors in InductorError).
    root = _exception_chain(err)[-1]
    kind = f"{type(err).__name__}/{type(root).__name__}"
    if permanent:
        _unavailable = True
        kind = f"permanent:{kind}"
    if kind in _warned:
        return
    _warned.add(kind)
    first_line = str(err).splitlines()[0] if str(err).strip() else ""
    if permanent:
        what = (
            "using eager torch ops for the rest of the process (same results, slower; "
            "fusedce.set_cpu_compile(True) tries again). Set FUSEDCE_CPU_COMPILE=0 to skip the "
            "attempt."
        )
    else:
        what = (
            "this call used eager torch ops instead (same results, slower); later calls try "
            "the compiled rows again."
        )
    warnings.warn(
        f"fusedce: compiling the CPU cross-entropy rows failed ({type(err).__name__}: "
        f"{first_line}); {what}",
        RuntimeWarning,
        stacklevel=4,  # the caller of run_plain_rows / of the log-probs' compiled rows
    )
