"""The torch backend: the row contract from torch ops, for CPU tensors and float64, and the
reductions around it (the mean scale with the class-index check, the sum of the row losses, the
scaling by the upstream gradient).

It defines the numbers the Triton kernel is held to; the formulas are in ``core.py``. As there,
everything is computed from the row max: log-probabilities are (z - m) - log_sum, never z - lse.
On the CPU a call is worked through in row blocks (``rows_per_call``); large plain blocks take
the Inductor-compiled rows (``cpu_compiled``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import index_check
from ..options import LossOptions, accumulation_dtype
from ..stat_rows import COEF, CORRECT, ENTROPY, LOG_SUM, LOSS, MAX, STAT_ROWS, Z_PART
from . import cpu_compiled

# On the CPU the eager ops work through the rows in chunks of about this many bytes of
# accumulation-dtype values, so that the upcast copy of half-precision rows and the
# intermediates stay in cache (bfloat16 4096 x 32000 on one thread: about 3x faster than
# unchunked).
CPU_ROW_BLOCK_BYTES = 2 << 20
# The Inductor-compiled rows fuse every pass into one loop per row, so they need no cache
# blocking; but each call is a few OpenMP parallel regions whose barriers wait for every thread.
# On a machine where another process takes a core, a thread that is descheduled holds every
# barrier for a time slice: 2 MiB blocks (hundreds of regions a call) made a call several times
# slower than eager torch there. Large blocks keep the regions few; the block bounds the
# compiled function's temporaries.
CPU_COMPILED_BLOCK_BYTES = 32 << 20


def _target_terms(
    target: Tensor, weight: Tensor | None, opts: LossOptions, V: int, acc: torch.dtype
) -> dict:
    """What the loss and the gradient need from the targets, per row.

    Probabilities: ``coef`` (M, V), the coefficient of each logit. Class indices: ``hard`` (M,),
    the coefficient of the true-class logit, ``y`` (M,) that class (0 where there is none),
    ``valid`` / ``bad`` (M,) masks and ``smooth`` = eps / C, the smoothing coefficient that
    every class gets (times its weight).
    """
    eps = opts.label_smoothing
    smooth = eps / V
    if target.dim() == 2:
        coef = (1.0 - eps) * target.to(acc) + smooth
        if weight is not None:
            coef.mul_(weight)
        return {"coef": coef}
    y = target.long()
    valid = y != opts.ignore_index
    y_ok = valid & (y >= 0) & (y < V)
    y_safe = torch.where(y_ok, y, 0)
    hard = y_ok.to(acc) * (1.0 - eps)
    if weight is not None:
        hard = hard * weight[y_safe]
    return {"hard": hard, "y": y_safe, "valid": valid, "bad": valid & ~y_ok, "smooth": smooth}


def transformed_logits(
    x: Tensor, opts: LossOptions, need_derivative: bool = True
) -> tuple[Tensor, Tensor | float | None]:
    """z = softcap(logit_scale * x) and dz/dx (None when z is x, a float for a scale alone).

    softcap c: z = c * tanh(s * x / c), dz/dx = s * (1 - tanh**2) = s * (1 - (z / c)**2).
    """
    s, c = opts.logit_scale, opts.softcap
    if c is None:
        if s == 1.0:
            return x, None
        return x * s, s
    th = torch.tanh(x * (s / c))
    dz = (1.0 - th * th).mul_(s) if need_derivative else None
    return th.mul_(c), dz


def _plain_rows(
    logits: Tensor,
    target: Tensor,
    opts: LossOptions,
    stats: Tensor,
    grad: Tensor | None,
    scale: Tensor | None,
) -> None:
    """The row contract for class indices and nothing else (no weights, smoothing or extras),
    in fewer passes over the logits: one softmax computed in the accumulation dtype straight
    from the input (no upcast copy), one max, and one multiply that writes the gradient in the
    logits' dtype (one rounding).

    log_sum = -log(p_max): p_max >= 1 / V never underflows, and it is 1 / sum(exp(x - max)) as
    softmax computed it. The loss is (max - x_y) + log_sum (shift-exact).
    """
    M, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    y = target.long()
    if cpu_compiled.applies(logits):
        out = cpu_compiled.run_plain_rows(logits, y, opts.ignore_index, grad, scale)
        if out is not None:
            stats[LOSS].copy_(out[0])
            stats[MAX].copy_(out[1])
            stats[LOG_SUM].copy_(out[2])
            stats[COEF].copy_(y != opts.ignore_index)
            return
    valid = y != opts.ignore_index
    y_ok = valid & (y >= 0) & (y < V)
    bad = valid & ~y_ok
    y_safe = torch.where(y_ok, y, 0)[:, None]
    xmax, imax = logits.max(dim=1)
    p = torch.softmax(logits, dim=1, dtype=acc)
    m = xmax.to(acc)
    empty = m == float("-inf")  # no finite logit: softmax gives NaN, the log-sum is -inf
    m = torch.where(empty, 0.0, m)
    log_sum = torch.where(empty, float("-inf"), p.gather(1, imax[:, None])[:, 0].log().neg_())
    x_y = logits.gather(1, y_safe)[:, 0].to(acc)
    loss = torch.where(valid, (m - x_y) + log_sum, 0.0)
    if bool(bad.any()):  # CPU: reading the mask costs no sync
        loss = torch.where(bad, float("nan"), loss)
    stats[LOSS].copy_(loss)
    stats[MAX].copy_(m)
    stats[LOG_SUM].copy_(log_sum)
    stats[COEF].copy_(valid.to(acc))
    if grad is None:
        return
    # grad = s * (softmax - onehot(y)) on valid rows: the -1 in the accumulation dtype first,
    # then one multiply that rounds once into the gradient's dtype.
    p.scatter_add_(1, y_safe, -y_ok.to(acc)[:, None])
    factor = scale.to(acc).expand(M) if scale.dim() == 0 else scale.to(acc)
    torch.mul(p, torch.where(valid, factor, 0.0)[:, None], out=grad)
    if not bool(valid.all()):  # ignored rows exactly 0, also with NaN logits
        grad.masked_fill_(~valid[:, None], 0.0)
    if bool(bad.any()):
        grad.masked_fill_(bad[:, None], float("nan"))


def _is_plain(
    target: Tensor, opts: LossOptions, stats: Tensor, grad_only: bool, *unset: Tensor | None
) -> bool:
    """Whether a call is the plain row contract (class indices and nothing else): the rows that
    ``_plain_rows`` computes, through the compiled function where it applies. ``unset``: the
    class and token weights, None in a plain call."""
    return (
        not grad_only
        and target.dim() == 1
        and all(t is None for t in unset)
        and stats.shape[0] == STAT_ROWS
        and opts.label_smoothing == 0.0
        and opts.z_loss == 0.0
        and not opts.transforms_logits
    )


def run_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    stats: Tensor,
    grad: Tensor | None,
    scale: Tensor | None,
    grad_only: bool = False,
    token_weight: Tensor | None = None,
) -> None:
    """The row contract (see ``core.run_rows``) from torch ops."""
    M, V = logits.shape
    if M == 0:
        return
    if _is_plain(target, opts, stats, grad_only, weight, token_weight):
        _plain_rows(logits, target, opts, stats, grad, scale)
        return
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)  # no copy for float32 / float64 logits
    # z: what the loss sees; a new tensor when scaled or softcapped (then x is left alone).
    z, dz_dx = transformed_logits(x, opts, need_derivative=grad is not None)
    w = weight
    tw = token_weight
    lam = opts.z_loss
    terms = _target_terms(target, w, opts, V, acc)
    soft = "coef" in terms
    valid = torch.ones(M, dtype=torch.bool, device=x.device) if soft else terms["valid"]
    cpu = logits.device.type == "cpu"
    if grad_only:
        m, log_sum, a = stats[MAX], stats[LOG_SUM], stats[COEF]
        lse = m + log_sum
    else:
        m = z.amax(1)
        m = torch.where(m == float("-inf"), 0.0, m)  # a row with no finite logit
        # (z - m) - log_sum: the log-probabilities, from the row max (shift-exact), built in the
        # gradient buffer where it can hold them.
        in_grad = grad is not None and grad.dtype == acc and grad.is_contiguous()
        if in_grad and not grad.is_set_to(z):
            logp = torch.sub(z, m[:, None], out=grad)
        else:
            logp = z - m[:, None]
        log_sum = torch.logsumexp(logp, dim=1)
        logp.sub_(log_sum[:, None])
        lse = m + log_sum
        if soft:
            coef = terms["coef"]
            a = coef.sum(1)
            # 0 * log(0) counts as 0 (its limit), also where a logit is -inf.
            loss = -torch.where(coef != 0, coef * logp, 0.0).sum(1)
        else:
            hard, smooth = terms["hard"], terms["smooth"]
            loss = -hard * logp.gather(1, terms["y"][:, None])[:, 0]
            a = hard
            if opts.label_smoothing > 0.0:
                if w is None:
                    w_sum, w_logp = float(V), logp.sum(1)
                elif bool((w == 0).any()):  # keep 0 * -inf = 0 where a class weight is 0
                    w_sum, w_logp = w.sum(), torch.where(w != 0, logp, 0.0) @ w
                else:
                    w_sum, w_logp = w.sum(), logp @ w
                loss = loss - smooth * w_logp
                a = a + smooth * w_sum
            a = torch.where(valid, a, 0.0)
            loss = torch.where(valid, loss, 0.0)
        z_part = None
        if lam > 0.0 or stats.shape[0] > STAT_ROWS:
            z_part = torch.where(valid, lam * lse * lse, 0.0) if lam > 0.0 else loss * 0.0
            loss = loss + z_part
        if tw is not None:
            loss = loss * tw
            z_part = z_part * tw if z_part is not None else None
        if not soft:
            loss = torch.where(terms["bad"], float("nan"), loss)
        if stats.shape[0] > STAT_ROWS:
            p_ = logp.exp()
            # H = -sum p log p, with 0 * log 0 = 0 (also where a logit is -inf).
            entropy = -torch.where(p_ > 0, p_ * logp, 0.0).sum(1)
            pred = z.argmax(1)
            if soft:
                correct = pred == target.argmax(1)
            else:
                correct = valid & ~terms["bad"] & (pred == terms["y"])
            stats[Z_PART].copy_(z_part)
            stats[ENTROPY].copy_(entropy)
            stats[CORRECT].copy_(correct)
        stats[LOSS].copy_(loss)
        stats[MAX].copy_(m)
        stats[LOG_SUM].copy_(log_sum)
        stats[COEF].copy_(a)
    if grad is None:
        return

    # grad = scale * t * (a' * softmax(z) - b) * dz/dx, a' = a + 2 lambda lse: in place where
    # the buffer allows.
    s = scale.to(acc)
    if tw is not None:
        s = s * tw
    s_row = s[:, None] if s.dim() == 1 else s
    p = logp.exp_() if not grad_only else (z - m[:, None]).sub_(log_sum[:, None]).exp_()
    a_eff = a + torch.where(valid, (2.0 * lam) * lse, 0.0) if lam > 0.0 else a
    p.mul_(a_eff[:, None] * s_row)
    if soft:
        p.sub_(terms["coef"].mul_(s_row))
    else:
        hard = terms["hard"]
        hard_s = hard * (s if s.dim() == 1 else s.expand(M))
        p.scatter_add_(1, terms["y"][:, None], -hard_s[:, None])
        if opts.label_smoothing > 0.0:
            w_row = w if w is not None else torch.ones(V, dtype=acc, device=x.device)
            row_s = torch.where(valid, terms["smooth"] * (s if s.dim() == 1 else s.expand(M)), 0.0)
            p.addr_(row_s, w_row, alpha=-1.0)
    if dz_dx is not None:
        p.mul_(dz_dx)  # the chain rule through the scale and the softcap
    if not soft:
        bad = terms["bad"]
        # Ignored rows are exactly 0 (also with NaN logits); unchecked bad rows are NaN. On the
        # CPU, skip these passes when no row needs them (reading the masks costs no sync there).
        if not cpu or not bool(valid.all()):
            p.masked_fill_(~valid[:, None], 0.0)
        if not cpu or bool(bad.any()):
            p.masked_fill_(bad[:, None], float("nan"))
    if p is not grad:
        grad.copy_(p)


def rows_per_call(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    stats: Tensor,
    grad_only: bool,
    token_weight: Tensor | None,
) -> int:
    """How many rows of this (M, V) call one ``run_rows`` call takes: on the CPU, the rows of
    ``CPU_ROW_BLOCK_BYTES`` (``CPU_COMPILED_BLOCK_BYTES`` for the compiled rows) of
    accumulation-dtype values; elsewhere all of them."""
    M, V = logits.shape
    if logits.device.type != "cpu":
        return M
    work = max(V, 1) * torch.finfo(accumulation_dtype(logits.dtype)).bits // 8
    plain = _is_plain(target, opts, stats, grad_only, weight, token_weight)
    compiled = plain and cpu_compiled.applies(logits)  # the Inductor rows take the call whole
    return max(1, (CPU_COMPILED_BLOCK_BYTES if compiled else CPU_ROW_BLOCK_BYTES) // work)


def inverse_normaliser(denom: Tensor) -> Tensor:
    """1 / denom, and 0 where denom is exactly 0: a mean over nothing (every target ignored, or
    no rows) gives 0, not NaN -- a documented deviation from torch. A negative normaliser
    (negative class weights) divides as torch does."""
    return torch.where(denom != 0, 1.0 / denom, 0.0)


def mean_normaliser(
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    acc: torch.dtype = torch.float32,
    token_weight: Tensor | None = None,
) -> Tensor:
    """torch's normaliser of reduction="mean", generalised to token weights t, as an ``acc``
    device scalar (no host sync).

    Class indices: sum of t_i * w_{y_i} over the non-ignored targets (their count without
    weights). Probabilities: sum of t_i (the number of rows without token weights).
    """
    if target.dim() == 2:
        if token_weight is not None:
            return token_weight.sum(dtype=acc)
        return torch.full((), float(target.shape[0]), dtype=acc, device=target.device)
    valid = target != ignore_index
    if weight is None and token_weight is None:
        return valid.sum(dtype=acc)
    if weight is None:
        per = torch.ones((), dtype=acc, device=target.device)
    else:
        # Clamp so that an unchecked bad index cannot gather out of bounds.
        per = weight[target.clamp(0, weight.numel() - 1).long()].to(acc)
    if token_weight is not None:
        per = per * token_weight.to(acc)
    return torch.where(valid, per, 0.0).sum(dtype=acc)


def mean_scale(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: LossOptions,
    check: bool,
    token_weight: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The () gradient scale (1 / the mean normaliser in the accumulation dtype, or float32 1)
    and, with ``check``, the count of out-of-range class indices (else None)."""
    V = logits.shape[1]
    n_bad = index_check.count_bad_indices(target, V, opts.ignore_index) if check else None
    if opts.mean:
        acc = accumulation_dtype(logits.dtype)
        denom = mean_normaliser(target, weight, opts.ignore_index, acc, token_weight)
        return inverse_normaliser(denom), n_bad
    return torch.ones((), dtype=torch.float32, device=logits.device), n_bad


def reduce_rows(loss_rows: Tensor, scale: Tensor, mean: bool) -> Tensor:
    """The sum of the (M,) per-row losses, times ``scale`` when ``mean``."""
    total = loss_rows.sum()
    return total * scale.to(total.dtype) if mean else total


def scale_rows_(grad: Tensor, factor: Tensor) -> None:
    """``grad *= factor`` in place for a () factor; a factor of exactly 1 moves no data (reading
    it is free on the CPU, a host sync elsewhere)."""
    if bool(factor != 1):
        grad.mul_(factor.to(grad.dtype))
