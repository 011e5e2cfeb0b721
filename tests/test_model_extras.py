"""Classifier's loss extras (z_loss, logit_softcap, loss_logit_scale) and the metrics it logs
from the loss's one-pass statistics: fused vs torch agreement, metric names, the fused head's
accuracy, checkpoints. Short in-process runs with real Lightning on tiny data."""

from __future__ import annotations

import csv
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from fusedce.datamodules import CurveDataModule, TeacherDataModule
from fusedce.lightning_modules import Classifier

EXTRAS = {
    "z_loss": {"z_loss": 0.05},
    "softcap": {"logit_softcap": 2.0},
    "scale": {"loss_logit_scale": 0.5},
    "all": {"z_loss": 0.05, "logit_softcap": 3.0, "loss_logit_scale": 2.0, "label_smoothing": 0.1},
}
STEP_METRICS = ("train/loss_step", "train/acc_step", "train/entropy_step", "train/z_loss_step")
EPOCH_METRICS = (
    "train/loss_epoch",
    "train/ce",
    "train/acc_epoch",
    "train/entropy_epoch",
    "train/z_loss_epoch",
    "val/loss",
    "val/acc",
    "val/acc_best",
    "val/entropy",
    "val/z_loss",
)


def make_trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**defaults, **kwargs})


def reference(
    logits: torch.Tensor, target: torch.Tensor, hp: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and statistics from the definitions, in float64 (hard targets use -100 = ignored)."""
    z = logits.double() * hp.get("loss_logit_scale", 1.0)
    cap = hp.get("logit_softcap")
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    tgt = target.double() if target.is_floating_point() else target
    ce = F.cross_entropy(z, tgt, label_smoothing=hp.get("label_smoothing", 0.0))
    valid = torch.ones(len(z), dtype=torch.bool) if target.is_floating_point() else target != -100
    lse = torch.logsumexp(z, -1)
    z_part = hp.get("z_loss", 0.0) * lse[valid].square().sum() / valid.sum()
    p = torch.softmax(z, -1)
    cls = target.argmax(-1) if target.is_floating_point() else target
    stats = {
        "z_loss": z_part,
        "lse": lse,
        "entropy": -(p * torch.log(p)).sum(-1),
        "correct": (z.argmax(-1) == cls) & valid,
    }
    return ce + z_part, stats


# ---------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"z_loss": -1e-4}, "z_loss must be >= 0"),
        ({"z_loss": math.nan}, "z_loss must be a finite number"),
        ({"logit_softcap": 0.0}, "logit_softcap must be > 0"),
        ({"logit_softcap": -30.0}, "logit_softcap must be > 0"),
        ({"loss_logit_scale": 0.0}, "loss_logit_scale must be > 0"),
        ({"loss_logit_scale": math.inf}, "loss_logit_scale must be a finite number"),
        ({"loss_logit_scale": "2"}, "loss_logit_scale must be a finite number"),
    ],
)
def test_invalid_extras_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Classifier(**kwargs)


def test_defaults_change_nothing() -> None:
    model = Classifier(num_classes=5)
    assert (model.hparams.z_loss, model.hparams.logit_softcap, model.hparams.loss_logit_scale) == (
        0.0,
        None,
        1.0,
    )
    logits = torch.randn(8, 5)
    torch.testing.assert_close(model.loss_logits(logits), logits)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_fused_and_torch_loss_and_stats_match_the_definitions(extra: str, soft: bool) -> None:
    """Both loss_impl values give the loss, gradient and statistics of the float64 definitions."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(16, 10)).requires_grad_()
    if soft:
        target = torch.softmax(torch.randn(16, 10), -1)
    else:
        target = torch.randint(0, 10, (16,))
        target[[2, 9]] = -100
    ref_loss, ref_stats = reference(logits, target, EXTRAS[extra])
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)
    for impl in ("fused", "torch"):
        model = Classifier(num_classes=10, loss_impl=impl, **EXTRAS[extra])
        loss, stats = model.cross_entropy_with_stats(logits, target)
        assert loss.dtype == torch.float32 and loss.shape == ()
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad.float().double(), rtol=1e-4, atol=1e-6)
        for name in ("z_loss", "lse", "entropy"):
            got = getattr(stats, name).double()
            torch.testing.assert_close(got, ref_stats[name], rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(stats.correct, ref_stats["correct"])
        assert not any(t.requires_grad for t in stats)
        torch.testing.assert_close(model.cross_entropy(logits, target), loss.detach())


# ---------------------------------------------------------------------------------- training
class RecordStep(Callback):
    """Records the objective of every training step and the step metrics logged with it."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        m = trainer.callback_metrics
        self.metrics.append({k: float(m[k]) for k in STEP_METRICS if k in m})


def _fit_curve(tmp_path: Path, impl: str, **hp: Any) -> tuple[RecordStep, Trainer]:
    seed_everything(5)
    model = Classifier(hidden_sizes=[16], loss_impl=impl, **hp)
    rec = RecordStep()
    trainer = make_trainer(
        tmp_path / impl,
        max_steps=8,
        max_epochs=-1,
        limit_train_batches=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        callbacks=[rec],
        logger=CSVLogger(tmp_path / impl, name="", version=""),
    )
    data = CurveDataModule(num_samples=600, batch_size=32, seed=0)
    trainer.fit(model, datamodule=data)
    return rec, trainer


def _csv_rows(trainer: Trainer) -> list[dict[str, str]]:
    trainer.loggers[0].finalize("success")
    return list(csv.DictReader((Path(trainer.loggers[0].log_dir) / "metrics.csv").open()))


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_fused_and_torch_training_agree_with_each_extra(tmp_path: Path, extra: str) -> None:
    """Same seed and data: the two loss_impl values give the same objectives, step metrics and
    epoch metrics (float32 rounding), and the metrics are logged under their names."""
    runs = {impl: _fit_curve(tmp_path, impl, **EXTRAS[extra]) for impl in ("fused", "torch")}
    (fused, trainer), (torch_, _) = runs["fused"], runs["torch"]
    has_z = "z_loss" in EXTRAS[extra]
    step_keys = {k for k in STEP_METRICS if has_z or "z_loss" not in k}
    epoch_keys = {k for k in EPOCH_METRICS if has_z or "z_loss" not in k}
    assert len(fused.losses) == len(torch_.losses) == 8
    torch.testing.assert_close(torch.stack(fused.losses), torch.stack(torch_.losses))
    for a, b in zip(fused.metrics, torch_.metrics, strict=True):
        assert set(a) == set(b) == step_keys
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    rows = {impl: _csv_rows(t) for impl, (_, t) in runs.items()}
    logged = {k for r in rows["fused"] for k, v in r.items() if v}
    assert has_z or not any("z_loss" in k for k in logged)
    for key in step_keys | epoch_keys:
        values = [[float(r[key]) for r in rows[impl] if r.get(key)] for impl in rows]
        assert values[0], f"{key} missing from metrics.csv"
        assert values[0] == pytest.approx(values[1], rel=1e-4, abs=1e-5), key
    m = trainer.callback_metrics
    assert 0 < float(m["val/entropy"]) < math.log(2) + 1e-6  # two classes
    assert 0 <= float(m["val/acc"]) <= 1
    # train/ce is the objective without the z-loss term (no l1 / l2 here)
    z_part = float(m["train/z_loss_epoch"]) if has_z else 0.0
    assert float(m["train/ce"]) + z_part == pytest.approx(float(m["train/loss_epoch"]), rel=1e-5)
    if has_z:
        assert z_part > 0 and float(m["val/z_loss"]) > 0


def test_without_z_loss_no_z_loss_metric_and_test_metrics(tmp_path: Path) -> None:
    rec, trainer = _fit_curve(tmp_path, "fused", logit_softcap=5.0)
    rows = _csv_rows(trainer)
    keys = {k for r in rows for k, v in r.items() if v}
    assert not any("z_loss" in k for k in keys)
    for key in ("train/acc_step", "train/entropy_step", "val/acc", "val/entropy", "val/loss"):
        assert key in keys
    assert all("train/z_loss_step" not in m for m in rec.metrics)
    model = trainer.lightning_module
    data = CurveDataModule(num_samples=600, batch_size=32, seed=0)
    out = trainer.test(model, datamodule=data, verbose=False)[0]
    assert {"test/loss", "test/acc", "test/entropy"} <= set(out) and "test/z_loss" not in out


class HeadCalls(Callback):
    """Counts calls of the output layer during fit and computes, before each training step, the
    argmax accuracy of the step's logits apart from the model's metrics."""

    def __init__(self) -> None:
        self.head_calls = 0
        self.expected: list[float] = []
        self.logged: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def count(*_: Any) -> None:
            self.head_calls += 1

        pl_module.head.register_forward_hook(count)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        with torch.no_grad():  # F.linear on the head's weights: no call of the head module
            logits = F.linear(pl_module.features(x), pl_module.head.weight, pl_module.head.bias)
            preds = pl_module.loss_logits(logits).argmax(-1)
        keep = y != -100
        self.expected.append(float(((preds == y) & keep).sum() / keep.sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged.append(float(trainer.callback_metrics["train/acc_step"]))


def _fused_head_data() -> DataLoader:
    """256 rows ``x (8,)`` labelled ``argmax(x)`` (8 classes), every 7th row ignored."""
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    y = x.argmax(-1)
    y[::7] = -100  # ignored rows: not counted by the accuracy
    return DataLoader(TensorDataset(x, y), batch_size=64)


def _fused_head_model(**kwargs: Any) -> Classifier:
    hp = {"z_loss": 1e-3, "logit_softcap": 4.0, "loss_logit_scale": 1.5, **kwargs}
    optimizer = partial(torch.optim.Adam, lr=0.05)
    return Classifier(in_features=8, num_classes=8, hidden_sizes=[16], optimizer=optimizer, **hp)


def test_fused_head_logs_argmax_accuracy_without_an_extra_head_gemm(tmp_path: Path) -> None:
    """The fused head's train/acc (from the loss's `correct`) equals the argmax accuracy of the
    step's logits, on every step, and the output layer is never called during training."""
    seed_everything(0)
    model = _fused_head_model(fused_head=True)
    calls = HeadCalls()
    trainer = make_trainer(tmp_path, max_steps=12, max_epochs=-1, callbacks=[calls])
    trainer.fit(model, train_dataloaders=_fused_head_data())
    assert len(calls.logged) == 12
    assert calls.logged == pytest.approx(calls.expected, abs=1e-6)
    assert len(set(calls.expected)) > 3 and max(calls.expected) > 0.5  # it learns: a real test
    assert calls.head_calls == 0
    assert torch.isfinite(trainer.callback_metrics["train/z_loss_step"])


def test_fused_head_matches_torch_with_extras(tmp_path: Path) -> None:
    """fused_head + extras (fusedce.linear_cross_entropy) vs loss_impl torch: same objectives
    and the same logged accuracy, entropy and z-loss."""
    runs = []
    for impl in ("fused", "torch"):
        seed_everything(0)
        model = _fused_head_model(loss_impl=impl, fused_head=True)
        rec = RecordStep()
        trainer = make_trainer(tmp_path, max_steps=8, max_epochs=-1, callbacks=[rec])
        trainer.fit(model, train_dataloaders=_fused_head_data())
        runs.append(rec)
    torch.testing.assert_close(torch.stack(runs[0].losses), torch.stack(runs[1].losses))
    for a, b in zip(runs[0].metrics, runs[1].metrics, strict=True):
        assert set(a) == set(STEP_METRICS)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_keeps_the_extras(tmp_path: Path) -> None:
    hp = {"z_loss": 1e-3, "logit_softcap": 5.0, "loss_logit_scale": 0.5}
    seed_everything(0)
    model = Classifier(hidden_sizes=[8], **hp)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(
        tmp_path, max_steps=3, max_epochs=-1, callbacks=[ckpt], enable_checkpointing=True
    )
    trainer.fit(model, datamodule=CurveDataModule(num_samples=300, batch_size=32, seed=0))
    loaded = Classifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    for key, value in hp.items():
        assert loaded.hparams[key] == value
    x, y = torch.rand(16, 2), torch.randint(0, 2, (16,))
    model.eval(), loaded.eval()
    a, b = (
        model.cross_entropy_with_stats(model(x), y),
        loaded.cross_entropy_with_stats(loaded(x), y),
    )
    torch.testing.assert_close(a, b)
    pred = trainer.predict(loaded, dataloaders=DataLoader(TensorDataset(x), batch_size=16))[0]
    probs = torch.softmax(loaded.loss_logits(loaded(x)), -1)  # the loss's own probabilities
    torch.testing.assert_close(pred["confidence"], probs.max(-1).values)


def test_extras_log_next_to_the_teacher_data_modules_hyperparameters(tmp_path: Path) -> None:
    """Lightning merges the model's and the data module's hyperparameters for its loggers and
    refuses a shared name with two values: the model's options do not collide with
    TeacherDataModule's (its ``logit_scale`` is the teacher's)."""
    data = TeacherDataModule(vocab_size=40, in_features=8, num_samples=256, batch_size=64)
    model = Classifier(
        in_features=8, num_classes=40, fused_head=True, z_loss=1e-4, loss_logit_scale=0.5
    )
    logger = CSVLogger(tmp_path, name="", version="")
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1, logger=logger)
    trainer.fit(model, datamodule=data)
    logged = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert logged["logit_scale"] == data.hparams.logit_scale
    assert logged["loss_logit_scale"] == 0.5 and logged["z_loss"] == 1e-4
    assert "train/z_loss" in trainer.callback_metrics
