"""Networks trained by `Classifier`: the MLP (or, without hidden layers, the linear model)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

from torch import Tensor, nn

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu"]
Init = Literal["default", "xavier", "kaiming"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
INITS = ("default", "xavier", "kaiming")


class MLP(nn.Module):
    """``logits = head(body(x))``: hidden layers, then one output Linear.

    ``body`` is ``[Linear -> (BatchNorm1d) -> activation -> (Dropout)] * len(hidden_sizes)`` and
    ``head`` is ``Linear(hidden_sizes[-1], num_classes)``. With ``hidden_sizes=[]`` the body is
    empty and the network is the linear model ``softmax(W x + b)`` (before the softmax).

    Args:
        in_features: Input dimension ``D``.
        num_classes: Number of classes ``C``.
        hidden_sizes: Widths of the hidden layers; empty = linear model.
        activation: Hidden activation.
        batch_norm: BatchNorm1d after each hidden Linear.
        dropout: Dropout probability after each hidden activation, in [0, 1).
        init: Weight init: PyTorch's default, Xavier-uniform (gain of the activation; 1 for the
            head) or Kaiming-normal (the activation's nonlinearity; ``linear`` for the head). With
            ``xavier`` and ``kaiming`` every bias is zeroed.

    Raises:
        ValueError: If a size, the activation, the dropout or the init is out of range.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (),
        activation: Activation = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
        init: Init = "default",
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must all be >= 1, got {hidden_sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if init not in INITS:
            raise ValueError(f"init must be 'default', 'xavier' or 'kaiming', got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        layers: list[nn.Module] = []
        width = in_features
        for h in hidden_sizes:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self._init_weights(init, activation)

    def _init_weights(self, init: str, activation: str) -> None:
        if init == "default":
            return
        for m in self.linears():
            is_head = m is self.head
            if init == "xavier":
                gain = 1.0 if is_head else nn.init.calculate_gain(_gain_name(activation))
                nn.init.xavier_uniform_(m.weight, gain=gain)
            else:
                nonlin = "linear" if is_head else _gain_name(activation)
                nn.init.kaiming_normal_(m.weight, nonlinearity=nonlin)
            nn.init.zeros_(m.bias)

    def linears(self) -> Iterator[nn.Linear]:
        """Every Linear layer, input to output (the head last)."""
        return (m for m in self.modules() if isinstance(m, nn.Linear))

    def features(self, x: Tensor) -> Tensor:
        """Hidden representation ``(B, D) -> (B, H)`` fed to the head (``H = D`` if no body)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, D) -> (B, C)``."""
        return self.head(self.body(x))


def _gain_name(activation: str) -> str:
    # torch.nn.init has no gain for GELU; ReLU's is the usual stand-in.
    return {"gelu": "relu"}.get(activation, activation)
