"""``token_log_probs``' torch-backend rows compiled by TorchInductor, for large CPU row blocks.

The entropy row and the gradient rows (``log_prob_rows``) take 5 to 7 eager passes over a row
block; Inductor fuses each into one loop per row, as ``cpu_compiled`` does for the plain
cross-entropy rows (whose switch, ``set_cpu_compile`` / ``FUSEDCE_CPU_COMPILE``, and failure
handling this module shares). float32 / bfloat16 / float16 logits; float64 and small blocks stay
eager. A failed compiled call returns False and the caller runs the eager ops.

The temperature travels as a 0-dim tensor, so that one compiled function serves every value.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor

from . import cpu_compiled

# Below this many logits per row block the eager ops cost no more than the compiled call.
MIN_BLOCK_LOGITS = cpu_compiled.MIN_BLOCK_LOGITS
# log q below this gives q = 0 in float32 (exp underflows near -104): clamping there changes no
# q, and keeps q * log q at 0 where a logit is -inf (never 0 * inf).
LOG_Q_FLOOR = -1e4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_compiled: dict[tuple[str, torch.dtype], object] = {}


def _entropy(x: Tensor, m: Tensor, log_sum: Tensor, inv_t: Tensor) -> Tensor:
    """(M,) H = log_sum - sum_c q_c (z_c - m) of z = x * inv_t, from the row max."""
    d = (x.float() * inv_t - m[:, None]).clamp_min(LOG_Q_FLOOR)
    q = (d - log_sum[:, None]).exp()
    return log_sum - (q * d).sum(1)


def _gradient(
    x: Tensor,
    m: Tensor,
    log_sum: Tensor,
    c0: Tensor,
    neg_g_h: Tensor,
    col: Tensor,
    hot: Tensor,
    valid: Tensor,
    bad: Tensor,
    inv_t: Tensor,
) -> Tensor:
    """(M, V) float32 q * (c0 + neg_g_h * log q) + hot at column ``col`` (the factors already
    divided by T); 0 on ignored rows, NaN on bad ones. ``log q = (z - m) - log_sum``."""
    log_q = (x.float() * inv_t - m[:, None]) - log_sum[:, None]
    g = log_q.exp() * (c0[:, None] + neg_g_h[:, None] * log_q.clamp_min(LOG_Q_FLOOR))
    cols = torch.arange(x.shape[1], device=x.device)[None, :]
    g = g + torch.where(cols == col[:, None], hot[:, None], 0.0)
    g = torch.where(valid[:, None], g, 0.0)
    return torch.where(bad[:, None], float("nan"), g)


def _gradient_out(out: Tensor, *args: Tensor) -> None:
    out.copy_(_gradient(*args))


def _gradient_inplace(x: Tensor, *args: Tensor) -> None:
    x.copy_(_gradient(x, *args))


_FUNCTIONS = {"entropy": _entropy, "grad": _gradient_out, "inplace": _gradient_inplace}


def _compiled_fn(kind: str, dtype: torch.dtype):
    """One compiled copy per (kind, dtype): Dynamo keeps its variants and recompile limit per
    code object (as ``cpu_compiled._compiled_fn``)."""
    key = (kind, dtype)
    fn = _compiled.get(key)
    if fn is None:
        base = _FUNCTIONS[kind]
        name = f"log_prob_{base.__name__.lstrip('_')}_{str(dtype).removeprefix('torch.')}"
        copy = types.FunctionType(base.__code__.replace(co_name=name), base.__globals__, name)
        fn = torch.compile(copy, dynamic=True, fullgraph=True)
        _compiled[key] = fn
    return fn


def applies(logits: Tensor) -> bool:
    """Whether this (M, V) row block takes the compiled functions."""
    M, V = logits.shape
    return (
        cpu_compiled.cpu_compile_enabled()
        and logits.device.type == "cpu"
        and logits.dtype in _DTYPES
        and M >= 2
        and V >= 2
        and M * V >= MIN_BLOCK_LOGITS
        and not torch.compiler.is_compiling()
    )


def entropy(logits: Tensor, m: Tensor, log_sum: Tensor, inv_t: float) -> Tensor | None:
    """(M,) float32 entropies of a row block, or None where the compiled call failed."""
    try:
        with torch.no_grad():  # one grad mode: Dynamo guards on it
            t = torch.tensor(inv_t, dtype=torch.float32)
            return _compiled_fn("entropy", logits.dtype)(logits, m, log_sum, t)
    except Exception as err:
        cpu_compiled._report_failure(err)
        return None


def gradient(
    logits: Tensor,
    out: Tensor,
    m: Tensor,
    log_sum: Tensor,
    factors: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
    inv_t: float,
) -> bool:
    """Writes a row block's gradient into ``out`` (may be ``logits``); False where the compiled
    call failed. ``factors``: (c0, neg_g_h, col, hot, valid, bad), (M,) each."""
    try:
        with torch.no_grad():
            t = torch.tensor(inv_t, dtype=torch.float32)
            rest = (m, log_sum, *factors, t)
            if out.is_set_to(logits):
                _compiled_fn("inplace", logits.dtype)(logits, *rest)
            else:
                _compiled_fn("grad", logits.dtype)(out, logits, *rest)
    except Exception as err:
        cpu_compiled._report_failure(err)
        return False
    return True
