"""The classification LightningModule: trains an `MLP` (or the linear model) with cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric

import fusedce
from fusedce import CrossEntropyStats

from .distillation import Divergence, check_distillation, fused_distillation
from .networks import MLP, Activation, Init
from .torch_loss import scaled_logits, torch_cross_entropy, valid_rows
from .vocab_parallel import (
    HeadShard,
    clip_gradients,
    grad_total_norm,
    shard_head,
    split_params,
)

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

    The loss sees ``z = c * tanh(s * logits / c)`` with ``s = loss_logit_scale`` and ``c =
    logit_softcap`` (just ``s * logits`` without a softcap; `loss_logits`). Objective: ``CE(z) +
    z_loss * mean(lse(z)**2) + l1 * sum|W| + l2 * sum W**2``, the means over the rows that count,
    the penalties over the weight matrices of all Linear layers (biases and BatchNorm excluded);
    ``l2`` is independent of the optimizer's ``weight_decay``. With ``loss_impl="fused"`` the
    scale, softcap and z-loss are fusedce's ``logit_scale``, ``softcap`` and ``z_loss`` (inside
    its single pass); with ``"torch"`` they are torch ops on the logits, from the same definitions.

    Logged metrics, all from the statistics that the loss returns in the same pass over the
    logits (``return_stats=True``; no extra pass, and no extra head GEMM with the fused head):
    ``train/loss`` (the whole objective), ``train/ce`` (the cross-entropy alone),
    ``train/z_loss`` (the z-loss term; only when ``z_loss > 0``), ``train/entropy`` (mean entropy
    of ``softmax(z)`` over the rows that count) and ``train/acc`` (top-1 accuracy); the same
    under ``val/`` and ``test/``, where ``loss`` is the cross-entropy alone (no z-loss, no
    penalties), plus ``val/acc_best``. Accuracy and entropy are torchmetrics ``MeanMetric``s
    weighted by the rows that count (synchronised over ranks). ``train/grad_norm`` is the
    gradients' total 2-norm before clipping. Throughput is left to Lightning's
    ``ThroughputMonitor`` callback (see ``configs/default.yaml``).

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
            ``"torch"`` the same objective is computed unfused. Its statistics (accuracy,
            entropy, z-loss) come from the logit chunks it computes anyway.
            ``linear_cross_entropy`` takes class indices only: soft-target batches use
            ``fusedce.cross_entropy`` on materialised logits instead.
        z_loss: Coefficient ``lambda >= 0`` of the z-loss ``lambda * lse(z)**2`` (PaLM) added per
            row that counts; keeps the log-normaliser near 0. 0 = off.
        logit_softcap: Soft cap ``c > 0``: the loss sees ``c * tanh(z / c)`` (Gemma 2), after
            the scale; None = no cap.
        loss_logit_scale: Scale ``s > 0`` of the logits: the loss sees ``s * logits`` (``1/T``
            for a temperature ``T``). Not named ``logit_scale``: Lightning merges the model's
            and the data module's hyperparameters for the loggers, and
            `datamodules.TeacherDataModule` has a ``logit_scale`` of its own.
        l1: L1 penalty coefficient (>= 0).
        l2: L2 penalty coefficient (>= 0).
        optimizer: Optimizer factory, called with the parameters (any ``torch.optim`` class).
        lr_scheduler: Optional LR scheduler factory, called with the optimizer.
        scheduler_monitor: Metric watched by ``ReduceLROnPlateau``.
        scheduler_interval: Step the scheduler every ``"epoch"`` or every ``"step"``.
        compile: ``torch.compile`` the network's forward (logits ``(B, D) -> (B, C)``; the fused
            head's features too). Weights and checkpoints are the same as without it.
        vocab_parallel: Split the output layer by class rows over the ranks (Lightning's
            ``ModelParallelStrategy``, its ``tensor_parallel`` mesh dimension; see
            ``configs/large_vocab_tp.yaml``): each rank holds ``(C_r, H)`` rows of the head
            and the loss is fusedce's vocabulary-parallel loss; the hidden layers are
            replicated. The z-loss, softcap and logit scale go to the sharded loss, and the
            statistics come from its pass (the full rows, no extra communication); l1 / l2 of
            the head cost one scalar all-reduce. Only with ``loss_impl="fused"``, no
            ``inplace_backward``; no ``predict``.
        distill_top_k: With ``fused_head`` and soft targets (the teacher's distribution P,
            ``(B, C)``): train on the teacher's top-k only (the tail as one bin), through
            ``fusedce.linear_distillation_loss`` (`distillation.fused_distillation`); logged
            as ``train/divergence`` (no ``train/ce`` / ``train/acc`` / ``train/entropy``: the
            logits are never built). 0 (default): the cross-entropy against the whole P.
        distill_divergence: The divergence of ``distill_top_k`` / ``distill_dense``:
            ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        distill_dense: With ``fused_head`` and soft targets from a data module with a
            ``teacher_head(x) -> (hidden, weight)`` (`datamodules.TeacherDataModule`): train on
            the teacher's whole distribution with both heads fused (neither head's logits are
            built whole); logged as ``train/divergence``.

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
        z_loss: float = 0.0,
        logit_softcap: float | None = None,
        loss_logit_scale: float = 1.0,
        l1: float = 0.0,
        l2: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        compile: bool = False,
        vocab_parallel: bool = False,
        distill_top_k: int = 0,
        distill_divergence: Divergence = "forward_kl",
        distill_dense: bool = False,
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if loss_impl not in ("fused", "torch"):
            raise ValueError(f"loss_impl must be 'fused' or 'torch', got {loss_impl!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if l1 < 0 or l2 < 0:
            raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
        _check_number("z_loss", z_loss, positive=False)
        if logit_softcap is not None:
            _check_number("logit_softcap", logit_softcap, positive=True)
        _check_number("loss_logit_scale", loss_logit_scale, positive=True)
        check_distillation(
            distill_top_k,
            distill_divergence,
            distill_dense,
            {
                "vocab_parallel": vocab_parallel,
                "z_loss": z_loss != 0,
                "label_smoothing": label_smoothing != 0,
                "logit_softcap": logit_softcap is not None,
                "loss_logit_scale": loss_logit_scale != 1,
            },
        )
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
        if vocab_parallel:
            _check_vocab_parallel(self.hparams)
        self._shard: HeadShard | None = None  # set by configure_model when vocab_parallel
        # Compiled functions, not modules: the state dict keeps the plain `net.*` names.
        self._compiled: tuple[Any, Any] | None = None
        if compile:
            self._compiled = (torch.compile(self.net.forward), torch.compile(self.net.features))
        elif not vocab_parallel:
            # One row that Lightning's model summary runs to count the forward's FLOPs and
            # show each layer's sizes (without it: FLOPs 0). Not with compile (a compilation
            # for a batch of one) nor the sharded head (its layers exist only after setup).
            self.example_input_array = {"x": torch.zeros(1, in_features)}

        # Weighted by the rows that count; states are not in the state dict (checkpoints keep
        # val/acc_best beside it: `on_save_checkpoint`).
        self.train_acc, self.train_entropy = MeanMetric(), MeanMetric()
        self.train_loss, self.train_ce, self.train_z_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_divergence = MeanMetric()  # distill_top_k / distill_dense
        self.val_loss, self.val_acc, self.val_acc_best = MeanMetric(), MeanMetric(), MaxMetric()
        self.val_entropy, self.val_z_loss = MeanMetric(), MeanMetric()
        self.test_loss, self.test_acc = MeanMetric(), MeanMetric()
        self.test_entropy, self.test_z_loss = MeanMetric(), MeanMetric()
        self._resumed_acc_best: float | None = None  # val/acc_best of a resumed checkpoint

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stores ``val/acc_best`` (``checkpoint["val_acc_best"]``): a resumed fit goes on
        from it."""
        if self.val_acc_best.update_count:
            checkpoint["val_acc_best"] = float(self.val_acc_best.compute())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reads checkpoints whose weights sit under ``body.*`` / ``head.*`` (no ``net.``);
        keeps the stored ``val/acc_best`` for a resumed fit (`on_train_start`)."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(("body.", "head."))]:
            state[f"net.{key}"] = state.pop(key)
        self._resumed_acc_best = checkpoint.get("val_acc_best")

    def configure_model(self) -> None:
        """With ``vocab_parallel``: splits the head over the strategy's ``tensor_parallel``
        mesh dimension (all other layers stay replicated); otherwise nothing.

        Raises:
            ValueError: If the strategy has no device mesh, or more tensor-parallel ranks than
                classes.
        """
        if not self.hparams.get("vocab_parallel") or self._shard is not None:
            return
        mesh = self.device_mesh
        if mesh is None:
            raise ValueError(
                "vocab_parallel needs trainer.strategy "
                "lightning.pytorch.strategies.ModelParallelStrategy (no device mesh); see "
                "configs/large_vocab_tp.yaml"
            )
        if mesh["data_parallel"].size() != 1:
            raise ValueError(
                "vocab_parallel: data_parallel_size must be 1 (tensor parallelism only), got "
                f"{mesh['data_parallel'].size()}"
            )
        self._shard = shard_head(self.head, mesh["tensor_parallel"])

    # ------------------------------------------------------------------------------ loss
    def loss_logits(self, logits: Tensor) -> Tensor:
        """The logits ``z`` that the loss sees, ``(B, C) -> (B, C)`` float32: ``s * logits``,
        then ``c * tanh(z / c)`` (``s = loss_logit_scale``, ``c = logit_softcap`` when set)."""
        return scaled_logits(logits, self.hparams.loss_logit_scale, self.hparams.logit_softcap)

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss (float32 scalar) of logits ``(B, C)`` against hard ``(B,)`` or soft
        ``(B, C)`` targets: mean cross-entropy of `loss_logits` plus the z-loss term."""
        return self.cross_entropy_with_stats(logits, target)[0]

    def cross_entropy_with_stats(
        self, logits: Tensor, target: Tensor, process_group: Any = None
    ) -> tuple[Tensor, CrossEntropyStats]:
        """`cross_entropy` and its statistics from the same pass over the logits.

        Args:
            logits: ``(B, C)`` logits (with ``process_group``: this rank's classes).
            target: Hard ``(B,)`` class indices or soft ``(B, C)`` probabilities (with
                ``process_group``: this rank's columns).
            process_group: The ranks the classes are split over (the sharded head), or None.

        Returns:
            ``(loss, stats)``: ``loss`` as `cross_entropy`; ``stats`` a
            ``fusedce.CrossEntropyStats`` of detached tensors: ``z_loss`` (the z-loss term, ``()``),
            ``lse``, ``entropy`` (``(B,)`` float32) and ``correct`` (``(B,)`` bool, False for
            ignored rows). ``loss_impl="torch"`` computes them with torch ops from their
            definitions.
        """
        hp = self.hparams
        if target.is_floating_point():
            target = target.float()
        if hp.loss_impl == "torch":
            return torch_cross_entropy(logits, target, **self._loss_options())
        options = self._loss_options(return_stats=True)
        if process_group is None:
            options["inplace_backward"] = hp.inplace_backward
        else:
            options["process_group"] = process_group
        return fusedce.cross_entropy(logits, target, **options)

    def _loss_options(self, **more: Any) -> dict[str, Any]:
        """The loss's keyword arguments from the hyperparameters (fusedce's names)."""
        hp = self.hparams
        return {
            "ignore_index": hp.ignore_index,
            "label_smoothing": hp.label_smoothing,
            "logit_scale": hp.loss_logit_scale,
            "softcap": hp.logit_softcap,
            "z_loss": hp.z_loss,
            **more,
        }

    def batch_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, CrossEntropyStats]:
        """The loss of a batch and its statistics: the one place the steps compute it.

        ``x`` ``(B, D)``; ``y`` class indices ``(B,)`` or probabilities ``(B, C)`` (with the
        sharded head: global, the same on every rank). Hard targets with ``fused_head`` go
        through ``fusedce.linear_cross_entropy`` (no ``(B, C)`` logits; under autocast it casts
        its inputs itself); everything else through `cross_entropy_with_stats` on the logits.
        With the sharded head the statistics come from the sharded loss's own pass: those of
        the full rows, identical on every rank, at no extra communication or GEMM.
        """
        sh = self._shard
        if not (self._fuse_head or sh is not None):
            return self.cross_entropy_with_stats(self(x), y)
        h = self.features(x)
        weight, bias = self.head.weight, self.head.bias
        group = None
        if sh is not None:
            weight, bias, group = weight.to_local(), bias.to_local(), sh.group
        if self._fuse_head and not y.is_floating_point():
            options = self._loss_options(return_stats=True)
            if group is not None:
                options["process_group"] = group
            return fusedce.linear_cross_entropy(h, weight, y, linear_bias=bias, **options)
        if sh is None:
            return self.cross_entropy_with_stats(self.head(h), y)
        local_logits = self.head(h)  # (B, C_r); backward all-reduces h's gradient
        target = y.float()[:, sh.start : sh.start + sh.width] if y.is_floating_point() else y
        return self.cross_entropy_with_stats(local_logits, target, process_group=group)

    def regularization(self) -> Tensor:
        """``l1 * sum|W| + l2 * sum W**2`` over all Linear weight matrices (0-dim tensor)."""
        hp = self.hparams
        reg = torch.zeros((), device=self.head.weight.device)
        if hp.l1 == 0 and hp.l2 == 0:
            return reg
        for m in self.net.linears():
            w = m.weight
            if self._shard is not None and m is self.head:
                # The sharded head (a DTensor): each rank sums its rows (a partial sum), made
                # whole by one scalar all-reduce; backward gives each rank its rows' gradient.
                term = hp.l1 * w.abs().sum() + hp.l2 * w.pow(2).sum()
                reg = reg + term.full_tensor()
                continue
            if hp.l1:
                reg = reg + hp.l1 * w.abs().sum()
            if hp.l2:
                reg = reg + hp.l2 * w.pow(2).sum()
        return reg

    # ------------------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step on ``(x (B, D), y (B,) or (B, C))``; returns the objective."""
        x, y = batch
        hp = self.hparams
        stats = None
        if self._fuse_head and y.is_floating_point() and (hp.distill_top_k or hp.distill_dense):
            # no logits: no statistics
            teacher_head = self.trainer.datamodule.teacher_head if hp.distill_dense else None
            loss = fused_distillation(
                x,
                y,
                self.features,
                self.head,
                top_k=hp.distill_top_k,
                divergence=hp.distill_divergence,
                teacher_head=teacher_head,
            )
        else:
            loss, stats = self.batch_loss(x, y)
        objective = loss + self.regularization()
        bs = x.shape[0]
        weights = valid_rows(y, self.hparams.ignore_index).float()
        # Metrics, not plain tensors: each rank logs its own step value and the epoch value is
        # the mean over all ranks' batches (torchmetrics syncs once, at the epoch's end).
        if stats is None:
            logged = {"loss": objective.detach(), "divergence": loss.detach()}
        else:
            logged = {"loss": objective.detach(), "ce": loss.detach() - stats.z_loss}
        if self.hparams.z_loss > 0 and stats is not None:
            logged["z_loss"] = stats.z_loss
        for name, value in logged.items():
            metric = getattr(self, f"train_{name}")
            metric(value, bs)
            self.log(
                f"train/{name}",
                metric,
                on_step=name != "ce",
                on_epoch=True,
                prog_bar=name == "loss",
            )
        if stats is None:
            return objective
        self.train_acc(stats.correct.float(), weights)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        self.train_entropy(stats.entropy.float(), weights)
        self.log("train/entropy", self.train_entropy, on_step=True, on_epoch=True)
        return objective

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        loss, stats = self.batch_loss(x, y)
        weights = valid_rows(y, self.hparams.ignore_index).float()
        n = weights.sum()  # the loss is a mean over the rows that count: weight it by them
        getattr(self, f"{stage}_loss").update(loss - stats.z_loss, n)
        getattr(self, f"{stage}_acc").update(stats.correct.float(), weights)
        getattr(self, f"{stage}_entropy").update(stats.entropy.float(), weights)
        if self.hparams.z_loss > 0:
            getattr(self, f"{stage}_z_loss").update(stats.z_loss, n)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulates the validation metrics."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulates the test metrics."""
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Predictions for ``x`` of shape ``(B, D)`` (or a batch ``(x, y)`` / ``(x,)``).

        Returns:
            ``{"inputs": (B, D) x, "preds": (B,) int64 class, "confidence": (B,) probability
            of that class under ``softmax(loss_logits(logits))``}``, plus ``"targets": (B,)
            int64`` when the batch has labels (soft targets ``(B, C)``: their argmax), so that
            predictions can be matched.
        """
        if self._shard is not None:
            raise NotImplementedError(
                "predict with vocab_parallel: the head is split over ranks; predict with the "
                "checkpoint on one device (vocab_parallel false)"
            )
        x = batch[0] if isinstance(batch, list | tuple) else batch
        probs = torch.softmax(self.loss_logits(self(x)), dim=-1)
        conf, preds = probs.max(dim=-1)
        out = {"inputs": x.detach(), "preds": preds, "confidence": conf}
        if isinstance(batch, list | tuple) and len(batch) > 1:
            y = batch[1]
            out["targets"] = y.argmax(dim=-1) if y.is_floating_point() else y
        return out

    def setup(self, stage: str) -> None:
        """Sets `flops_per_batch` = 6 x weight-matrix entries x batch rows (the matmuls of a
        forward + backward step; biases, activations and the loss are not counted)."""
        try:
            dm = self.trainer.datamodule
        except RuntimeError:  # not attached to a trainer
            dm = None
        rows = getattr(dm, "batch_size", None)
        if isinstance(rows, int) and rows > 0:
            weights = sum(m.weight.numel() for m in self.net.linears())
            self.flops_per_batch = 6 * weights * rows

    # ------------------------------------------------------------------------------ epoch ends
    def on_train_start(self) -> None:
        """Forgets the sanity check's validation values; a resumed fit starts ``val/acc_best``
        from the checkpoint's."""
        for name in ("loss", "acc", "acc_best", "entropy", "z_loss"):
            getattr(self, f"val_{name}").reset()
        if self._resumed_acc_best is not None:
            self.val_acc_best.update(torch.tensor(self._resumed_acc_best, device=self.device))
            self._resumed_acc_best = None

    def _log_eval_epoch(self, stage: str) -> Tensor | None:
        """Logs ``{stage}/loss``, ``/acc``, ``/entropy`` (and ``/z_loss``), synchronised over
        ranks; returns the accuracy (None when nothing was accumulated)."""
        loss_m = getattr(self, f"{stage}_loss")
        if loss_m.update_count == 0:
            return None
        acc = getattr(self, f"{stage}_acc").compute()
        prog_bar = stage == "val"
        self.log(f"{stage}/loss", loss_m.compute(), prog_bar=prog_bar, sync_dist=True)
        self.log(f"{stage}/acc", acc, prog_bar=prog_bar, sync_dist=True)
        self.log(f"{stage}/entropy", getattr(self, f"{stage}_entropy").compute(), sync_dist=True)
        if self.hparams.z_loss > 0:
            self.log(f"{stage}/z_loss", getattr(self, f"{stage}_z_loss").compute(), sync_dist=True)
        for name in ("loss", "acc", "entropy", "z_loss"):
            getattr(self, f"{stage}_{name}").reset()
        return acc

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/loss``, ``val/acc``, ``val/entropy``, ``val/z_loss`` (when ``z_loss > 0``)
        and ``val/acc_best`` (synchronised over ranks)."""
        acc = self._log_eval_epoch("val")
        if acc is None:
            return
        self.val_acc_best.update(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        """Logs ``test/loss``, ``test/acc``, ``test/entropy`` and ``test/z_loss`` (when
        ``z_loss > 0``)."""
        self._log_eval_epoch("test")

    # ------------------------------------------------------------------------------ optim
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Logs the gradients' total 2-norm as ``train/grad_norm`` (Lightning clips after this)."""
        if self._shard is not None:
            norm = grad_total_norm(self.parameters(), self._shard)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            return
        norms = grad_norm(self, norm_type=2)
        if norms:
            self.log("train/grad_norm", norms[_GRAD_NORM_TOTAL], on_step=True, on_epoch=False)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping; with ``vocab_parallel`` the same over the sharded head's and
        the replicated layers' gradients together (torch's clips refuse the mix)."""
        if self._shard is None or not gradient_clip_val:
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        clip_gradients(
            self.parameters(), self._shard, gradient_clip_val, gradient_clip_algorithm or "norm"
        )

    def configure_optimizers(self) -> Any:
        """Builds the injected optimizer and (optional) scheduler."""
        params = split_params(self) if self._shard is not None else self.parameters()
        optimizer = self.optimizer_factory(params)
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


def _check_number(name: str, value: Any, positive: bool) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is a finite real number that is
    > 0 (``positive``) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_vocab_parallel(hp: Any) -> None:
    """Raises ``ValueError`` naming the options that ``vocab_parallel=True`` does not take."""
    refused = [
        name
        for name, ok in (
            ("loss_impl", hp.loss_impl == "fused"),
            ("inplace_backward", not hp.inplace_backward),
        )
        if not ok
    ]
    if refused:
        raise ValueError(
            "vocab_parallel=True takes loss_impl='fused' and no inplace_backward (the sharded "
            f"loss computes its own gradient); set: {', '.join(f'{k}={hp[k]!r}' for k in refused)}"
        )
