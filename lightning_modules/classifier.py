"""The classification LightningModule: softmax regression or an MLP, trained with fused CE."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu"]
Init = Literal["default", "xavier", "kaiming"]
LossImpl = Literal["fused", "torch"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


class Classifier(LightningModule):
    """Multiclass classifier ``logits = head(body(x))`` trained with cross-entropy.

    With ``hidden_sizes=[]`` the model is the seed's softmax regression ``softmax(W x + b)``;
    otherwise ``body`` is ``[Linear -> (BatchNorm) -> activation -> (Dropout)] * len(hidden_sizes)``
    and ``head`` a final ``Linear(hidden_sizes[-1], num_classes)``.

    Batches are ``(x, y)``: ``x`` of shape ``(B, in_features)``; ``y`` either class indices of
    shape ``(B,)`` (hard targets; ``ignore_index`` entries are skipped) or class probabilities of
    shape ``(B, num_classes)`` (soft targets, loss ``H(y, softmax(logits))``; accuracy is measured
    against ``argmax(y)``).

    Objective: ``CE + l1 * sum|W| + l2 * sum W**2`` over the weight matrices of all Linear layers
    (biases and BatchNorm excluded); ``l2`` is independent of the optimizer's ``weight_decay``.
    ``train/loss`` logs the whole objective, ``train/ce`` the cross-entropy alone; ``val/loss`` and
    ``test/loss`` are plain cross-entropy.

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
            ``linear_cross_entropy`` takes
            class indices only: soft-target batches use ``fusedce.cross_entropy`` on
            materialised logits instead.
        l1: L1 penalty coefficient (>= 0).
        l2: L2 penalty coefficient (>= 0).
        optimizer: Optimizer factory, called with the parameters (any ``torch.optim`` class).
        lr_scheduler: Optional LR scheduler factory, called with the optimizer.
        scheduler_monitor: Metric watched by ``ReduceLROnPlateau``.
        scheduler_interval: Step the scheduler every ``"epoch"`` or every ``"step"``.
    """

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
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must all be >= 1, got {hidden_sizes}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if init not in ("default", "xavier", "kaiming"):
            raise ValueError(f"init must be 'default', 'xavier' or 'kaiming', got {init!r}")
        if loss_impl not in ("fused", "torch"):
            raise ValueError(f"loss_impl must be 'fused' or 'torch', got {loss_impl!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if l1 < 0 or l2 < 0:
            raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams["hidden_sizes"] = hidden_sizes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

        layers: list[nn.Module] = []
        width = in_features
        for h in hidden_sizes:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self._init_weights(init, activation)

        self._kernels: Any = None
        self._linear_ce: Any = None
        if loss_impl == "fused":
            self._kernels = _import_kernels()
            if fused_head:
                self._linear_ce = _import_linear_cross_entropy()

        self.train_acc = MeanMetric()
        self.val_loss, self.val_acc, self.val_acc_best = MeanMetric(), MeanMetric(), MaxMetric()
        self.test_loss, self.test_acc = MeanMetric(), MeanMetric()
        self._t_last: float | None = None
        self._n_last = 0

    # ------------------------------------------------------------------------------ model
    def _init_weights(self, init: str, activation: str) -> None:
        if init == "default":
            return
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            is_head = m is self.head
            if init == "xavier":
                gain = 1.0 if is_head else nn.init.calculate_gain(_gain_name(activation))
                nn.init.xavier_uniform_(m.weight, gain=gain)
            else:
                nonlin = "linear" if is_head else _gain_name(activation)
                nn.init.kaiming_normal_(m.weight, nonlinearity=nonlin)
            nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """Hidden representation ``(B, D) -> (B, H)`` fed to the output layer."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, D) -> (B, C)``."""
        return self.head(self.body(x))

    # ------------------------------------------------------------------------------ loss
    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy (float32 scalar) of logits ``(B, C)`` against hard or soft targets."""
        hp = self.hparams
        if target.is_floating_point():
            target = target.float()
        if hp.loss_impl == "fused":
            return self._kernels.cross_entropy(
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
        for m in self.modules():
            if isinstance(m, nn.Linear):
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
        if self._linear_ce is not None and not y.is_floating_point():
            h = self.features(x)
            weight, bias = self.head.weight, self.head.bias
            device_type = h.device.type
            if torch.is_autocast_enabled(device_type):  # do what autocast does for F.linear
                dtype = torch.get_autocast_dtype(device_type)
                h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)
            ce = self._linear_ce(
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
        """Predictions for ``x`` of shape ``(B, D)`` (or a batch ``(x, ...)``).

        Returns:
            ``{"preds": (B,) int64 class, "confidence": (B,) softmax probability of that class}``.
        """
        x = batch[0] if isinstance(batch, list | tuple) else batch
        probs = torch.softmax(self(x).float(), dim=-1)
        conf, preds = probs.max(dim=-1)
        return {"preds": preds, "confidence": conf}

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

    # ------------------------------------------------------------------------------ throughput
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Logs ``train/samples_per_sec`` over the previous step (data loading included)."""
        now = time.perf_counter()
        if self._t_last is not None and now > self._t_last:
            sps = self._n_last / (now - self._t_last)
            self.log("train/samples_per_sec", sps, on_step=True, on_epoch=True, batch_size=1)
        self._t_last = now
        x = batch[0] if isinstance(batch, list | tuple) else batch
        self._n_last = int(x.shape[0]) * max(1, self.trainer.world_size if self._trainer else 1)

    def on_validation_start(self) -> None:
        """Keeps validation time out of the throughput figure."""
        self._t_last = None

    # ------------------------------------------------------------------------------ optim
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Logs the gradient's total 2-norm (``train/grad_norm``) BEFORE clipping, then clips."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            )
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.clip_gradients(
            optimizer,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )

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


def _gain_name(activation: str) -> str:
    return {"gelu": "relu"}.get(activation, activation)


def _import_kernels() -> Any:
    try:
        import fusedce
    except ImportError as err:  # pragma: no cover - kernels/ is part of this repository
        raise ImportError(
            "loss_impl='fused' needs the `kernels` package of this repository; "
            "use model.loss_impl=torch to train without it"
        ) from err
    return fusedce


def _import_linear_cross_entropy() -> Any:
    kernels = _import_kernels()
    fn = getattr(kernels, "linear_cross_entropy", None)
    if fn is None:
        raise ImportError(
            "fused_head=True needs fusedce.linear_cross_entropy, which this checkout does not "
            "provide yet; set model.fused_head=false"
        )
    return fn
