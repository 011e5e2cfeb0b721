"""``token_log_probs``' torch-backend rows compiled by TorchInductor, for large CPU row blocks.

The entropy row and the gradient rows (``log_probs.rows``) take 5 to 7 eager passes over a row
block; Inductor fuses each into one loop per row, as ``cpu_compiled`` does for the plain
cross-entropy rows. The switch (``set_cpu_compile`` / ``FUSEDCE_CPU_COMPILE``), which blocks
apply (``applies``), the compiled copies and the failure handling are ``cpu_compiled``'s
(``compiled_copy``, ``guarded_call``). float32 / bfloat16 / float16 logits; float64 and small
blocks stay eager. A failed compiled call returns None / False and the caller runs the eager ops.

The temperature travels as a 0-dim tensor, so that one compiled function serves every value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_compiled

# Whether an (M, V) row block takes the compiled functions: the same blocks as the plain rows.
applies = cpu_compiled.applies
# log q below this gives q = 0 in float32 (exp underflows near -104): clamping there changes no
# q, and keeps q * log q at 0 where a logit is -inf (never 0 * inf).
LOG_Q_FLOOR = -1e4


def _log_prob_entropy(x: Tensor, m: Tensor, log_sum: Tensor, inv_t: Tensor) -> Tensor:
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


def _log_prob_grad(out: Tensor, *args: Tensor) -> None:
    out.copy_(_gradient(*args))


def _log_prob_grad_inplace(x: Tensor, *args: Tensor) -> None:
    x.copy_(_gradient(x, *args))


def entropy(logits: Tensor, m: Tensor, log_sum: Tensor, inv_t: float) -> Tensor | None:
    """(M,) float32 entropies of a row block, or None where the compiled call failed."""
    t = torch.tensor(inv_t, dtype=torch.float32)
    fn = cpu_compiled.compiled_copy
    ok, h = cpu_compiled.guarded_call(
        lambda: fn(_log_prob_entropy, logits.dtype), logits, m, log_sum, t
    )
    return h if ok else None


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
    rest = (m, log_sum, *factors, torch.tensor(inv_t, dtype=torch.float32))
    if out.is_set_to(logits):
        base, args = _log_prob_grad_inplace, (logits, *rest)
    else:
        base, args = _log_prob_grad, (out, logits, *rest)
    ok, _ = cpu_compiled.guarded_call(lambda: cpu_compiled.compiled_copy(base, logits.dtype), *args)
    return ok
