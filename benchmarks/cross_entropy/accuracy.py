"""The correctness check of every provider: float64 references of the mean loss (all rows) and of
its gradient (a sample of rows), and the errors against them.

A reference takes the provider's one-pass extras (``providers.Extras``): the logits become
``z = softcap * tanh(logit_scale * x / softcap)``, each row's loss ``lse - z_y + z_loss * lse**2``,
and with token weights ``w`` the mean is ``sum_i w_i l_i / sum_i w_i``.
"""

from __future__ import annotations

import torch

from benchmarks.cross_entropy.providers import PLAIN, Extras

REF_CHUNK_ELEMS = 2**25  # float64 reference, computed over row chunks of this many elements
GRAD_SAMPLE_ROWS = 64


def _row_losses(xs: torch.Tensor, ts: torch.Tensor, extras: Extras) -> torch.Tensor:
    """float64 per-row losses (k,) of logits xs (k, V) with class indices ts (k,)."""
    z = xs.double() * extras.logit_scale
    if extras.softcap is not None:
        z = extras.softcap * torch.tanh(z / extras.softcap)
    lse = torch.logsumexp(z, dim=1)
    return lse - z.gather(1, ts[:, None]).squeeze(1) + extras.z_loss * lse.square()


def _normaliser(n: int, extras: Extras, w: torch.Tensor | None) -> float:
    if extras.token_weight:
        if w is None:
            raise ValueError("a token-weighted reference needs the token weights")
        return float(w.double().sum())
    return float(n)


def reference_loss(
    x: torch.Tensor, t: torch.Tensor, extras: Extras = PLAIN, w: torch.Tensor | None = None
) -> float:
    """Mean cross-entropy in float64 over all rows of x (N, V) with class indices t (N,).

    Args:
        x: logits (N, V).
        t: class indices (N,).
        extras: the provider's one-pass extras (``return_stats`` changes nothing here).
        w: token weights (N,), used when ``extras.token_weight``.

    Row chunks bound the float64 copy to REF_CHUNK_ELEMS elements.
    """
    n, v = x.shape
    rows = max(1, REF_CHUNK_ELEMS // v)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, n, rows):
        losses = _row_losses(x[s : s + rows].detach(), t[s : s + rows], extras)
        if extras.token_weight and w is not None:
            losses = losses * w[s : s + rows].double()
        total += losses.sum()
    norm = _normaliser(n, extras, w)
    return float(total) / norm if norm else 0.0


def sample_rows(n: int) -> torch.Tensor:
    """Row indices (k,) of the gradient subsample: up to GRAD_SAMPLE_ROWS spread over [0, n)."""
    return torch.linspace(0, n - 1, min(n, GRAD_SAMPLE_ROWS)).round().long().unique()


def reference_grad_rows(
    x: torch.Tensor,
    t: torch.Tensor,
    rows: torch.Tensor,
    extras: Extras = PLAIN,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 d mean-loss / d logits of the sampled rows, (k, V).

    Plain: ``(softmax - onehot) / N``; with extras, autograd through the float64 row losses,
    each row weighted by ``w_i / sum(w)`` (token weights) or ``1 / N``.
    """
    rows = rows.to(x.device)
    xs = x.detach()[rows].double().requires_grad_()
    with torch.enable_grad():
        losses = _row_losses(xs, t[rows], extras)
        if extras.token_weight and w is not None:
            losses = losses * w[rows].double()
        norm = _normaliser(x.shape[0], extras, w)
        (g,) = torch.autograd.grad(losses.sum() / (norm or 1.0), xs)
    return g


def grad_rel_err(grad: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> float:
    """||grad[rows] - ref|| / ||ref|| in float64, for grad (N, V) and ref (k, V)."""
    got = grad.detach()[rows.to(grad.device)].double()
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


def loss_errors(loss: float, ref: float) -> dict[str, float]:
    """Absolute and relative error of a loss value against its float64 reference."""
    return {"loss_err": abs(loss - ref), "loss_rel_err": abs(loss - ref) / max(abs(ref), 1e-30)}
