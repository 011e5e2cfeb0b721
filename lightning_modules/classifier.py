"""The classification LightningModule: trains an `MLP` (or the linear model) with cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric

import fusedce

from .networks import MLP, Activation, Init

LossImpl = Literal["fused", "torch"]

# The key under which `grad_norm(module, 2)` returns the total norm over all parameters.
_GRAD_NORM_TOTAL = f"grad_{2.0}_norm_total"


class Classifier(LightningModule):
    """Multiclass classifier ``logits = head(body(x))`` trained with cross-entropy.

    The network is an `MLP` built from ``in_features``, ``num_classes``, ``hidden_sizes``,
    ``activation``, ``batch_norm``, ``dropout`` and ``init`` (``self.net``; ``self.body`` and
    ``self.head`` are its two parts). With ``hidden_sizes=[]`` it is the linear model
    ``softmax(W x + b)``.

    Batches are ``(x, y)``: ``x`` of shape ``(B, in_features)``; ``y`` either class indices of
    shape ``(B,)`` (hard targets; ``ignore_index`` entries are skipped) or class probabilities of
    shape ``(B, num_classes)`` (soft targets, loss ``H(y, softmax(logits))``; accuracy is measured
    against ``argmax(y)``).

    Objective: ``CE + l1 * sum|W| + l2 * sum W**2`` over the weight matrices of all Linear layers
    (biases and BatchNorm excluded); ``l2`` is independent of the optimizer's ``weight_decay``.
    ``train/loss`` logs the whole objective, ``train/ce`` the cross-entropy alone; ``val/loss`` and
    ``test/loss`` are plain cross-entropy. ``train/grad_norm`` is the gradients' total 2-norm
    before clipping. Throughput is left to Lightning's ``ThroughputMonitor`` callback (see
    ``configs/default.yaml``).

    Args:
        in_features: Input dimension ``D`` (linked from the data module by ``train.py``).
        num_classes: Number of classes ``C`` (linked from the data module by ``train.py``).
        hidden_sizes: Widths of the hidden layers; empty = linear softmax model.
        activation: Hidden activation.
        batch_norm: BatchNorm1d after each hidden Linear.
        dropout: Dropout probability after each hidden activation, in [0, 1).
        init: Weight init: PyTorch's default, Xavier-uniform or Kaiming-normal (biases zeroed).
        loss_impl: ``"fused"`` = ``fusedce.cross_entropy``; ``"torch"`` = ``F.cross_entropy``
            (computed in float32), to compare both on the same run.
        label_smoothing: Passed to the loss, in [0, 1].
        ignore_index: Hard-target value that is ignored by loss and accuracy.
        inplace_backward: Let the fused loss write its gradient into the logits' storage.
        fused_head: Compute the output layer and the loss together with
            ``fusedce.linear_cross_entropy`` (never materialises the ``(B, C)`` logits for
            backward; meant for large vocabularies). Only with ``loss_impl="fused"``; with
            ``"torch"`` the same objective is computed unfused. ``train/acc`` then costs one
            more head GEMM, so it is computed on logging steps only (``log_every_n_steps``).
            ``linear_cross_entropy`` takes class indices only: soft-target batches use
            ``fusedce.cross_entropy`` on materialised logits instead.
        l1: L1 penalty coefficient (>= 0).
        l2: L2 penalty coefficient (>= 0).
        optimizer: Optimizer factory, called with the parameters (any ``torch.optim`` class).
        lr_scheduler: Optional LR scheduler factory, called with the optimizer.
        scheduler_monitor: Metric watched by ``ReduceLROnPlateau``.
        scheduler_interval: Step the scheduler every ``"epoch"`` or every ``"step"``.
        compile: ``torch.compile`` the network's forward (logits ``(B, D) -> (B, C)``; the fused
            head's features too). Weights and checkpoints are the same as without it.

    Raises:
        ValueError: If an argument is out of range (network arguments: see `MLP`).
    """

    # Read by Lightning's ThroughputMonitor on every batch (FLOPs/s, and MFU where the device
    # reports its peak); set in `setup` from the data module's batch size. None = not counted.
    flops_per_batch: int | None = None

    def __init__(
        self,
        in_features: int = 2,
        num_classes: int = 2,
        hidden_sizes: Sequence[int] = (),
        activation: Activation = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
        init: Init = "default",
        loss_impl: LossImpl = "fused",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        inplace_backward: bool = False,
        fused_head: bool = False,
        l1: float = 0.0,
        l2: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        compile: bool = False,
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if loss_impl not in ("fused", "torch"):
            raise ValueError(f"loss_impl must be 'fused' or 'torch', got {loss_impl!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if l1 < 0 or l2 < 0:
            raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
        self.net = MLP(
            in_features,
            num_classes,
            hidden_sizes,
            activation=activation,
            batch_norm=batch_norm,
            dropout=dropout,
            init=init,
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams["hidden_sizes"] = hidden_sizes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._fuse_head = loss_impl == "fused" and fused_head
        # Compiled functions, not modules: the state dict keeps the plain `net.*` names.
        self._compiled: tuple[Any, Any] | None = None
        if compile:
            self._compiled = (torch.compile(self.net.forward), torch.compile(self.net.features))

        self.train_acc = MeanMetric()
        self.val_loss, self.val_acc, self.val_acc_best = MeanMetric(), MeanMetric(), MaxMetric()
        self.test_loss, self.test_acc = MeanMetric(), MeanMetric()

    # ------------------------------------------------------------------------------ model
    @property
    def body(self) -> nn.Sequential:
        """The hidden layers of `net` (empty for the linear model)."""
        return self.net.body

    @property
    def head(self) -> nn.Linear:
        """The output layer of `net`."""
        return self.net.head

    def features(self, x: Tensor) -> Tensor:
        """Hidden representation ``(B, D) -> (B, H)`` fed to the output layer."""
        if self._compiled is not None:
            return self._compiled[1](x)
        return self.net.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, D) -> (B, C)``."""
        if self._compiled is not None:
            return self._compiled[0](x)
        return self.net(x)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reads checkpoints whose weights sit under ``body.*`` / ``head.*`` (no ``net.``)."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(("body.", "head."))]:
            state[f"net.{key}"] = state.pop(key)

    # ------------------------------------------------------------------------------ loss
    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy (float32 scalar) of logits ``(B, C)`` against hard or soft targets."""
        hp = self.hparams
        if target.is_floating_point():
            target = target.float()
        if hp.loss_impl == "fused":
            return fusedce.cross_entropy(
                logits,
                target,
                ignore_index=hp.ignore_index,
                label_smoothing=hp.label_smoothing,
                inplace_backward=hp.inplace_backward,
            )
        return F.cross_entropy(
            logits.float(),
            target,
            ignore_index=hp.ignore_index,
            label_smoothing=hp.label_smoothing,
        )

    def regularization(self) -> Tensor:
        """``l1 * sum|W| + l2 * sum W**2`` over all Linear weight matrices (0-dim tensor)."""
        hp = self.hparams
        reg = torch.zeros((), device=self.head.weight.device)
        if hp.l1 == 0 and hp.l2 == 0:
            return reg
        for m in self.net.linears():
            w = m.weight
            if hp.l1:
                reg = reg + hp.l1 * w.abs().sum()
            if hp.l2:
                reg = reg + hp.l2 * w.pow(2).sum()
        return reg

    def _correct(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Top-1 accuracy of logits ``(B, C)``; see `_correct_preds`."""
        return self._correct_preds(logits.argmax(dim=-1), target)

    def _correct_preds(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Accuracy of classes ``preds (B,)`` against hard ``(B,)`` or soft ``(B, C)`` targets.

        Returns:
            ``(accuracy, count)``: 0-dim tensors; ``count`` = rows that count (hard targets equal
            to ``ignore_index`` do not). No host synchronisation.
        """
        if target.is_floating_point():
            correct = preds == target.argmax(dim=-1)
            count = torch.tensor(float(correct.numel()), device=preds.device)
            return correct.float().mean(), count
        keep = target != self.hparams.ignore_index
        count = keep.sum().float()
        return ((preds == target) & keep).sum().float() / count.clamp_min(1.0), count

    # ------------------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step on ``(x (B, D), y (B,) or (B, C))``; returns the objective."""
        x, y = batch
        if self._fuse_head and not y.is_floating_point():
            h = self.features(x)
            weight, bias = self.head.weight, self.head.bias
            device_type = h.device.type
            if torch.is_autocast_enabled(device_type):  # do what autocast does for F.linear
                dtype = torch.get_autocast_dtype(device_type)
                h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)
            ce = fusedce.linear_cross_entropy(
                h,
                weight,
                y,
                linear_bias=bias,
                ignore_index=self.hparams.ignore_index,
                label_smoothing=self.hparams.label_smoothing,
            )
            acc = n = None
            if self._logging_step():  # accuracy costs one more head GEMM: only when logged
                with torch.no_grad():  # row chunks: never all (B, C) logits at once
                    preds = torch.cat([self.head(c).argmax(-1) for c in h.detach().split(256)])
                    acc, n = self._correct_preds(preds, y)
        else:
            logits = self(x)
            with torch.no_grad():
                acc, n = self._correct(logits.detach(), y)
            ce = self.cross_entropy(logits, y)
        loss = ce + self.regularization()
        bs = x.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=bs)
        if acc is not None:
            self.train_acc(acc, n)
            self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def _logging_step(self) -> bool:
        """Whether the trainer logs this step (always true outside a trainer)."""
        if self._trainer is None:
            return True
        return self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def _eval_step(
        self, batch: tuple[Tensor, Tensor], loss_m: MeanMetric, acc_m: MeanMetric
    ) -> None:
        x, y = batch
        logits = self(x)
        ce = self.cross_entropy(logits, y)
        acc, n = self._correct(logits, y)
        loss_m.update(ce, n)  # weight = rows that count (ignore_index rows do not)
        acc_m.update(acc, n)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulates validation loss and accuracy."""
        self._eval_step(batch, self.val_loss, self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulates test loss and accuracy."""
        self._eval_step(batch, self.test_loss, self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Predictions for ``x`` of shape ``(B, D)`` (or a batch ``(x, y)`` / ``(x,)``).

        Returns:
            ``{"inputs": (B, D) x, "preds": (B,) int64 class, "confidence": (B,) softmax
            probability of that class}``, plus ``"targets": (B,) int64`` when the batch has
            labels (soft targets ``(B, C)``: their argmax), so that predictions can be matched.
        """
        x = batch[0] if isinstance(batch, list | tuple) else batch
        probs = torch.softmax(self(x).float(), dim=-1)
        conf, preds = probs.max(dim=-1)
        out = {"inputs": x.detach(), "preds": preds, "confidence": conf}
        if isinstance(batch, list | tuple) and len(batch) > 1:
            y = batch[1]
            out["targets"] = y.argmax(dim=-1) if y.is_floating_point() else y
        return out

    def setup(self, stage: str) -> None:
        """Sets `flops_per_batch` = 6 x weight-matrix entries x batch rows (the matmuls of a
        forward + backward step; biases, activations and the loss are not counted)."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        rows = getattr(dm, "batch_size", None)
        if isinstance(rows, int) and rows > 0:
            weights = sum(m.weight.numel() for m in self.net.linears())
            self.flops_per_batch = 6 * weights * rows

    # ------------------------------------------------------------------------------ epoch ends
    def on_train_start(self) -> None:
        """Forgets the sanity check's validation values."""
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_acc_best.reset()

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/loss``, ``val/acc`` and ``val/acc_best`` (synchronised over ranks)."""
        if self.val_loss.update_count == 0:
            return
        loss, acc = self.val_loss.compute(), self.val_acc.compute()
        self.val_acc_best.update(acc)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
        self.val_loss.reset()
        self.val_acc.reset()

    def on_test_epoch_end(self) -> None:
        """Logs ``test/loss`` and ``test/acc``."""
        if self.test_loss.update_count == 0:
            return
        self.log("test/loss", self.test_loss.compute(), sync_dist=True)
        self.log("test/acc", self.test_acc.compute(), sync_dist=True)
        self.test_loss.reset()
        self.test_acc.reset()

    # ------------------------------------------------------------------------------ optim
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Logs the gradients' total 2-norm as ``train/grad_norm`` (Lightning clips after this)."""
        norms = grad_norm(self, norm_type=2)
        if norms:
            self.log("train/grad_norm", norms[_GRAD_NORM_TOTAL], on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Any:
        """Builds the injected optimizer and (optional) scheduler."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {
            "scheduler": scheduler,
            "interval": self.hparams.scheduler_interval,
        }
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.hparams.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
