"""The correctness check of every provider: float64 references of the mean loss (all rows) and of
its gradient (a sample of rows), and the errors against them."""

from __future__ import annotations

import torch

REF_CHUNK_ELEMS = 2**25  # float64 reference, computed over row chunks of this many elements
GRAD_SAMPLE_ROWS = 64


def reference_loss(x: torch.Tensor, t: torch.Tensor) -> float:
    """Mean cross-entropy in float64 over all rows of x (N, V) with class indices t (N,).

    Row chunks bound the float64 copy to REF_CHUNK_ELEMS elements.
    """
    n, v = x.shape
    rows = max(1, REF_CHUNK_ELEMS // v)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, n, rows):
        xs = x[s : s + rows].detach().double()
        ts = t[s : s + rows]
        total += (torch.logsumexp(xs, dim=1) - xs.gather(1, ts[:, None]).squeeze(1)).sum()
    return float(total) / n


def sample_rows(n: int) -> torch.Tensor:
    """Row indices (k,) of the gradient subsample: up to GRAD_SAMPLE_ROWS spread over [0, n)."""
    return torch.linspace(0, n - 1, min(n, GRAD_SAMPLE_ROWS)).round().long().unique()


def reference_grad_rows(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float64 d mean-loss / d logits of the sampled rows, (k, V): (softmax - onehot) / N."""
    rows = rows.to(x.device)
    xs = x.detach()[rows].double()
    g = torch.softmax(xs, dim=1)
    g[torch.arange(len(rows), device=x.device), t[rows]] -= 1.0
    return g / x.shape[0]


def grad_rel_err(grad: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> float:
    """||grad[rows] - ref|| / ||ref|| in float64, for grad (N, V) and ref (k, V)."""
    got = grad.detach()[rows.to(grad.device)].double()
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


def loss_errors(loss: float, ref: float) -> dict[str, float]:
    """Absolute and relative error of a loss value against its float64 reference."""
    return {"loss_err": abs(loss - ref), "loss_rel_err": abs(loss - ref) / max(abs(ref), 1e-30)}
