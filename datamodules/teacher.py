"""Large-vocabulary task: random features labelled by a fixed random teacher network."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .common import SplitDataModule, check_positive_int


class TeacherDataModule(SplitDataModule):
    """Features ``x ~ N(0, I)``, targets from a fixed random teacher over ``vocab_size`` classes.

    The teacher is a one-hidden-layer network drawn once from ``seed``::

        z = W2 @ tanh(W1 @ x + b1),   W1: (H, D), W2: (V, H),   H = teacher_hidden

    rescaled so that its logits ``z`` have standard deviation ``logit_scale`` (measured on a probe
    batch). Targets are

    * hard (``soft_targets=False``): ``y = argmax_v z_v``, shape ``(B,)`` int64;
    * soft (``soft_targets=True``): the teacher distribution ``P = softmax(z / temperature)``,
      shape ``(B, V)`` float32, so that the loss ``CE(Q, P) = H(P, Q)`` is distillation.

    Only the features (``N x D``) are stored. The teacher's logits / probabilities are never
    stored for the whole data set: they are computed per batch on the training device in
    `on_after_batch_transfer` (a ``(B, V)`` matmul), which keeps memory at ``O(B * V)`` even for
    ``V = 128k`` and uses the GPU when there is one. Everything is deterministic given ``seed``.

    Batches seen by the model: ``(x, y)`` with ``x`` of shape ``(B, D)`` float32 and ``y`` as above.

    Args:
        vocab_size: Number of classes ``V >= 2``.
        in_features: Feature dimension ``D``.
        num_samples: Total number of examples (train + val + test).
        val_fraction: Fraction of examples in the validation split, in (0, 1).
        test_fraction: Fraction of examples in the test split, in [0, 1).
        soft_targets: Use the teacher's full distribution as target instead of its argmax.
        temperature: Softmax temperature of the soft targets (> 0).
        logit_scale: Standard deviation of the teacher's logits (> 0); larger = peakier teacher.
        teacher_hidden: Hidden width ``H`` of the teacher (default: ``in_features``).
        batch_size: Batch size.
        num_workers: DataLoader worker processes.
        seed: Seed of the features, the teacher and the split.
        pin_memory: Pin host memory of the batches (useful on GPU).
    """

    def __init__(
        self,
        vocab_size: int = 32_000,
        in_features: int = 64,
        num_samples: int = 20_000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        soft_targets: bool = False,
        temperature: float = 1.0,
        logit_scale: float = 4.0,
        teacher_hidden: int | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self._init_split(num_samples, val_fraction, test_fraction, batch_size, num_workers)
        check_positive_int("in_features", in_features)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(
                f"vocab_size (num_classes) must be an integer >= 2, got {vocab_size!r}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
        if teacher_hidden is not None:
            check_positive_int("teacher_hidden", teacher_hidden)
        self.save_hyperparameters()
        self.num_classes = vocab_size
        self.in_features = in_features
        self._teacher_cpu: tuple[torch.Tensor, ...] | None = None
        self._teacher_dev: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # ----------------------------------------------------------------------------- teacher
    def _build_teacher(self) -> tuple[torch.Tensor, ...]:
        if self._teacher_cpu is None:
            hp = self.hparams
            hidden = hp.teacher_hidden or hp.in_features
            gen = torch.Generator().manual_seed(hp.seed + 1_000_003)
            w1 = torch.randn(hidden, hp.in_features, generator=gen) / math.sqrt(hp.in_features)
            b1 = 0.1 * torch.randn(hidden, generator=gen)
            w2 = torch.randn(hp.vocab_size, hidden, generator=gen)
            probe = torch.randn(64, hp.in_features, generator=gen)
            std = (torch.tanh(probe @ w1.T + b1) @ w2.T).std()
            w2 *= hp.logit_scale / std
            self._teacher_cpu = (w1, b1, w2)
        return self._teacher_cpu

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``z`` (before temperature).

        Args:
            x: Features, shape ``(B, D)``, on any device.

        Returns:
            Logits, shape ``(B, V)``, float32, on ``x``'s device.
        """
        if x.device not in self._teacher_dev:
            self._teacher_dev[x.device] = tuple(t.to(x.device) for t in self._build_teacher())
        w1, b1, w2 = self._teacher_dev[x.device]
        return torch.tanh(x.float() @ w1.T + b1) @ w2.T

    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor) -> torch.Tensor:
        """Targets for features ``x`` of shape ``(B, D)``.

        Returns:
            Class indices of shape ``(B,)`` (hard) or probabilities of shape ``(B, V)`` (soft).
        """
        logits = self.teacher_logits(x)
        if self.hparams.soft_targets:
            return torch.softmax(logits / self.hparams.temperature, dim=-1)
        return logits.argmax(dim=-1)

    @torch.no_grad()
    def reference_loss(self, device: torch.device | str = "cpu", rows: int = 1024) -> float:
        """The teacher's own cross-entropy on the validation split: the loss of a student that
        predicts exactly the teacher's distribution ``softmax(z / temperature)`` (hard targets:
        against its argmax; soft ones: the entropy of ``P``). A student's ``val/loss`` minus
        this says how far it is from the teacher (`lightning_modules.teacher_gap`).

        Args:
            device: Where the teacher's logits are computed (``rows`` x V at a time).
            rows: Validation rows per block.
        """
        if self.val_set is None:
            self.setup("fit")
        x_all = self.val_set.tensors[0]
        total = 0.0
        for start in range(0, len(x_all), rows):
            x = x_all[start : start + rows].to(device)
            z = self.teacher_logits(x) / self.hparams.temperature
            total += float(F.cross_entropy(z, self.teacher_targets(x), reduction="sum"))
        return total / max(len(x_all), 1)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turns a feature batch ``[x]`` into ``(x, targets)`` on the training device; a
        mapping (the model's ``example_input_array``, run by the model summary) passes as is."""
        if isinstance(batch, dict):
            return batch
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return x, self.teacher_targets(x)

    # ----------------------------------------------------------------------------- data
    def setup(self, stage: str | None = None) -> None:
        """Draws the features and the split (idempotent)."""
        if self.train_set is None:
            hp = self.hparams
            gen = torch.Generator().manual_seed(hp.seed)
            x = torch.randn(hp.num_samples, hp.in_features, generator=gen)
            n_train, n_val, _ = self.sizes
            self.train_set = TensorDataset(x[:n_train])
            self.val_set = TensorDataset(x[n_train : n_train + n_val])
            self.test_set = TensorDataset(x[n_train + n_val :])
        self._build_teacher()
