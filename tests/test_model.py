"""Classifier: architecture, loss switch, regularisation, optimisers, schedulers, clipping,
early stopping, resume, soft targets and the fused output layer. Short in-process runs."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from fusedce.datamodules import CurveDataModule, TeacherDataModule
from fusedce.lightning_modules import MLP, Classifier, batch_size
from fusedce.lightning_modules.torch_loss import accuracy


def small_curve(**kwargs) -> CurveDataModule:
    kwargs = {"num_samples": 1200, "batch_size": 64, "seed": 0, **kwargs}
    return CurveDataModule(**kwargs)


def make_trainer(tmp_path: Path, **kwargs) -> Trainer:
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


class RecordLosses(Callback):
    """Records the loss returned by every training step."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


# ---------------------------------------------------------------------------------- structure
def test_no_hidden_layer_is_the_linear_model_softmax_wx_plus_b() -> None:
    model = Classifier(in_features=2, num_classes=2, hidden_sizes=[])
    assert len(model.body) == 0
    assert [p.shape for p in model.parameters()] == [torch.Size([2, 2]), torch.Size([2])]
    x = torch.rand(5, 2)
    torch.testing.assert_close(model(x), x @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "gelu"])
@pytest.mark.parametrize("init", ["default", "xavier", "kaiming"])
def test_mlp_variants_build_and_run(activation: str, init: str) -> None:
    torch.manual_seed(0)
    model = Classifier(
        in_features=3,
        num_classes=4,
        hidden_sizes=[16, 8],
        activation=activation,
        init=init,
        batch_norm=True,
        dropout=0.1,
    )
    kinds = [type(m).__name__ for m in model.body]
    assert kinds.count("Linear") == 2 and kinds.count("BatchNorm1d") == 2
    assert kinds.count("Dropout") == 2
    assert model(torch.randn(7, 3)).shape == (7, 4)
    if init != "default":
        assert all(
            float(m.bias.detach().abs().sum()) == 0
            for m in model.modules()
            if isinstance(m, nn.Linear)
        )


def test_network_is_an_mlp_built_from_the_model_flags() -> None:
    torch.manual_seed(0)
    model = Classifier(in_features=3, num_classes=4, hidden_sizes=[8], init="xavier", dropout=0.1)
    torch.manual_seed(0)
    net = MLP(3, 4, [8], init="xavier", dropout=0.1)
    assert isinstance(model.net, MLP)
    assert model.body is model.net.body and model.head is model.net.head
    assert list(model.net.linears()) == [model.body[0], model.head]
    torch.testing.assert_close(model.net.state_dict(), net.state_dict())  # same init, same RNG use
    model.eval(), net.eval()
    x = torch.randn(5, 3)
    torch.testing.assert_close(model(x), net(x))
    torch.testing.assert_close(model.features(x), net.features(x))
    assert model.features(x).shape == (5, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 0}, "in_features must be >= 1"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"hidden_sizes": [4, 0]}, "hidden_sizes must all be >= 1"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"init": "orthogonal"}, "init must be"),
        ({"dropout": -0.1}, "dropout must be in"),
    ],
)
def test_invalid_network_settings_name_the_argument(kwargs: dict, message: str) -> None:
    args = {"in_features": 2, "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        MLP(**args)
    with pytest.raises(ValueError, match=message):
        Classifier(**args)


def test_checkpoint_with_weights_outside_net_still_loads(tmp_path: Path) -> None:
    """Checkpoints whose weights are named ``body.*`` / ``head.*`` (the Classifier held the
    layers itself before the network became `MLP`) load into ``net.*``."""
    model = Classifier(hidden_sizes=[8], batch_norm=True)
    trainer = make_trainer(tmp_path, max_steps=2, max_epochs=-1, limit_val_batches=0)
    trainer.fit(model, datamodule=small_curve())
    path = tmp_path / "flat.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"] = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    assert any(k.startswith("body.") for k in ckpt["state_dict"])
    torch.save(ckpt, path)
    loaded = Classifier.load_from_checkpoint(path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"hidden_sizes": [0]},
        {"dropout": 1.0},
        {"label_smoothing": 1.5},
        {"l1": -1.0},
        {"activation": "swish"},
        {"loss_impl": "numpy"},
    ],
)
def test_invalid_model_settings_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Classifier(**kwargs)


# ---------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_and_torch_loss_agree(soft: bool, label_smoothing: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 10, requires_grad=True)
    target = torch.softmax(torch.randn(16, 10), -1) if soft else torch.randint(0, 10, (16,))
    if not soft:
        target[3] = -100
    grads = []
    for impl in ("fused", "torch"):
        model = Classifier(num_classes=10, loss_impl=impl, label_smoothing=label_smoothing)
        loss = model.cross_entropy(logits, target)
        assert loss.dtype == torch.float32
        (g,) = torch.autograd.grad(loss, logits)
        grads.append((loss.detach(), g))
        ref = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grads[0], grads[1])


def test_l1_l2_are_added_to_the_objective_and_skip_biases() -> None:
    torch.manual_seed(0)
    model = Classifier(in_features=2, num_classes=3, hidden_sizes=[4], l1=0.01, l2=0.1)
    w = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    expected = 0.01 * sum(t.abs().sum() for t in w) + 0.1 * sum(t.pow(2).sum() for t in w)
    torch.testing.assert_close(model.regularization(), expected)
    x, y = torch.rand(8, 2), torch.randint(0, 3, (8,))
    model.log = lambda *a, **k: None  # outside a Trainer
    loss = model.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y) + expected)
    assert float(Classifier(l1=0, l2=0).regularization()) == 0.0


def _run(tmp_path: Path, loss_impl: str, steps: int = 30) -> tuple[list, dict]:
    seed_everything(123)
    model = Classifier(hidden_sizes=[32, 32], loss_impl=loss_impl, l2=1e-4)
    rec = RecordLosses()
    trainer = make_trainer(
        tmp_path, max_steps=steps, max_epochs=-1, callbacks=[rec], limit_val_batches=0
    )
    trainer.fit(model, datamodule=small_curve())
    return rec.losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fused_vs_torch_training_curves_agree(tmp_path: Path) -> None:
    """Same seed, same data order: the fused and torch losses give the same run up to float32
    rounding (losses of every step and the final weights, assert_close's float32 tolerance)."""
    fused_losses, fused_w = _run(tmp_path, "fused")
    torch_losses, torch_w = _run(tmp_path, "torch")
    assert len(fused_losses) == len(torch_losses) == 30
    torch.testing.assert_close(torch.stack(fused_losses), torch.stack(torch_losses))
    torch.testing.assert_close(fused_w, torch_w)


# ---------------------------------------------------------------------------------- optim
OPTIMIZERS = {
    "sgd_momentum": partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True),
    "adam": partial(torch.optim.Adam, lr=0.01),
    "adamw": partial(torch.optim.AdamW, lr=0.01, weight_decay=0.01),
    "rmsprop": partial(torch.optim.RMSprop, lr=0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains(tmp_path: Path, name: str) -> None:
    seed_everything(0)
    model = Classifier(hidden_sizes=[16], optimizer=OPTIMIZERS[name])
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=small_curve())
    assert isinstance(trainer.optimizers[0], OPTIMIZERS[name].func)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert float(trainer.callback_metrics["val/acc"]) > 0.6
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_step_scheduler_changes_lr(tmp_path: Path) -> None:
    model = Classifier(
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = make_trainer(tmp_path, max_epochs=3)
    trainer.fit(model, datamodule=small_curve())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_reduce_lr_on_plateau_monitors_val_loss(tmp_path: Path) -> None:
    # lr so small that val/loss never improves by ReduceLROnPlateau's threshold
    model = Classifier(
        optimizer=partial(torch.optim.SGD, lr=1e-6),
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5),
    )
    trainer = make_trainer(tmp_path, max_epochs=3)
    trainer.fit(model, datamodule=small_curve())
    assert trainer.lr_scheduler_configs[0].monitor == "val/loss"
    # epoch 0 sets the best, epochs 1 and 2 do not improve -> two halvings
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25e-6)


class NormSeenBySGD(torch.optim.SGD):
    """SGD that records the gradient exactly as its update sees it (after Lightning's clipping)."""

    norms: list[float]
    max_abs: list[float]

    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # forward, backward, on_before_optimizer_step, clipping
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.max_abs.append(max(float(g.abs().max()) for g in grads))
        super().step()
        return loss


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_bounds_what_the_optimizer_sees(tmp_path: Path, algorithm: str) -> None:
    NormSeenBySGD.norms, NormSeenBySGD.max_abs = [], []
    model = Classifier(hidden_sizes=[16], optimizer=partial(NormSeenBySGD, lr=0.1))
    logged = []

    class GradNorm(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            logged.append(float(trainer.callback_metrics["train/grad_norm"]))

    clip = 1e-3
    trainer = make_trainer(
        tmp_path,
        max_steps=15,
        max_epochs=-1,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        callbacks=[GradNorm()],
    )
    trainer.fit(model, datamodule=small_curve())
    assert len(NormSeenBySGD.norms) == 15
    if algorithm == "norm":
        assert max(NormSeenBySGD.norms) <= clip * (1 + 1e-5)
    else:
        assert max(NormSeenBySGD.max_abs) <= clip * (1 + 1e-6)
    # the logged norm is the one before clipping: clipping was really active
    assert min(logged) > 10 * clip


def test_early_stopping_stops_before_max_epochs(tmp_path: Path) -> None:
    model = Classifier(optimizer=partial(torch.optim.SGD, lr=1e-6))
    stopper = EarlyStopping(monitor="val/loss", patience=1, min_delta=1.0, mode="min")
    trainer = make_trainer(tmp_path, max_epochs=20, callbacks=[stopper])
    trainer.fit(model, datamodule=small_curve())
    assert trainer.current_epoch == 2  # epoch 0 sets the best, epoch 1 fails -> stop
    assert stopper.stopped_epoch == 1


def test_resume_from_checkpoint_continues_the_step_count(tmp_path: Path) -> None:
    dm = small_curve()  # 840 train samples / 64 -> 14 steps per epoch
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(Classifier(hidden_sizes=[8]), datamodule=dm)
    assert trainer.global_step == 28
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()

    seen_first_step = []

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if not seen_first_step:
                seen_first_step.append(trainer.global_step)

    resumed = make_trainer(tmp_path, max_epochs=3, callbacks=[FirstStep()])
    resumed.fit(Classifier(hidden_sizes=[8]), datamodule=dm, ckpt_path=str(last))
    assert seen_first_step == [28]
    assert resumed.global_step == 42 and resumed.current_epoch == 3


# ---------------------------------------------------------------------------------- metrics
def test_logged_metrics(tmp_path: Path) -> None:
    model = Classifier(hidden_sizes=[16], optimizer=partial(torch.optim.Adam, lr=0.02))
    # as configured in configs/default.yaml; the window is shorter than the 28 steps of this run
    throughput = ThroughputMonitor(batch_size_fn=batch_size, window_size=5)
    trainer = make_trainer(
        tmp_path,
        max_epochs=2,
        log_every_n_steps=1,
        num_sanity_val_steps=2,
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[throughput],
    )
    trainer.fit(model, datamodule=small_curve())
    m = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "train/grad_norm"):
        assert key in m and torch.isfinite(m[key])
    for key in ("val/loss", "val/acc", "val/acc_best"):
        assert key in m
    assert float(m["val/acc_best"]) >= float(m["val/acc"])
    # ThroughputMonitor writes to the loggers only (not to callback_metrics); on one device its
    # samples-per-second metric is train/device/samples_per_sec (train/samples_per_sec needs > 1)
    trainer.loggers[0].finalize("success")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    sps = _floats(rows, "train/device/samples_per_sec")
    assert len(sps) == 28 - 4  # logged every step once the window of 5 batches is full
    assert all(v > 0 for v in sps)
    assert not any(r.get("train/samples_per_sec") for r in rows)
    trainer.test(model, datamodule=small_curve())
    assert 0.5 < float(trainer.callback_metrics["test/acc"]) <= 1.0
    out = trainer.predict(model, datamodule=small_curve())
    assert out[0]["preds"].shape == (64,) and float(out[0]["confidence"].min()) >= 0.5
    assert model.hparams.hidden_sizes == [16] and "optimizer" not in model.hparams


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_grad_norm_is_the_total_norm_before_clipping(tmp_path: Path) -> None:
    """``train/grad_norm`` is the 2-norm of all gradients together, taken before clipping.

    It comes from ``lightning.pytorch.utilities.grad_norm``'s total entry: if Lightning renames
    that entry, this test fails."""
    seen: list[float] = []
    logged: list[float] = []

    class Reference(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.cat(grads))))

        def on_train_batch_end(self, trainer, *args) -> None:
            logged.append(float(trainer.callback_metrics["train/grad_norm"]))

    model = Classifier(hidden_sizes=[16], optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = make_trainer(
        tmp_path, max_steps=5, max_epochs=-1, gradient_clip_val=1e-3, callbacks=[Reference()]
    )
    trainer.fit(model, datamodule=small_curve())
    assert len(logged) == len(seen) == 5
    assert logged == pytest.approx(seen, rel=1e-5)
    assert min(logged) > 1e-2  # far above the clipping threshold


def test_ignore_index_is_skipped_by_accuracy() -> None:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    acc, n = accuracy(logits, torch.tensor([0, -100, 1]), ignore_index=-100)
    assert float(n) == 2 and float(acc) == 0.5
    acc, n = accuracy(logits, torch.full((3,), -100), ignore_index=-100)
    assert float(n) == 0 and float(acc) == 0.0


# ---------------------------------------------------------------------------------- large vocab
def _teacher_dm(soft: bool) -> TeacherDataModule:
    return TeacherDataModule(
        vocab_size=300, in_features=16, num_samples=1200, batch_size=64, soft_targets=soft
    )


@pytest.mark.parametrize("soft", [False, True])
def test_teacher_task_trains_with_hard_and_soft_targets(tmp_path: Path, soft: bool) -> None:
    seed_everything(0)
    dm = _teacher_dm(soft)
    model = Classifier(in_features=16, num_classes=300, hidden_sizes=[64])
    trainer = make_trainer(tmp_path, max_epochs=3)
    first = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val/loss"]) < first
    assert float(trainer.callback_metrics["val/acc"]) > 1 / 300


@pytest.mark.parametrize("soft", [False, True])
def test_fused_head_matches_unfused_training(tmp_path: Path, soft: bool) -> None:
    results = []
    for fused_head in (True, False):
        seed_everything(7)
        model = Classifier(
            in_features=16, num_classes=300, hidden_sizes=[32], fused_head=fused_head
        )
        rec = RecordLosses()
        trainer = make_trainer(
            tmp_path, max_steps=10, max_epochs=-1, callbacks=[rec], limit_val_batches=0
        )
        trainer.fit(model, datamodule=_teacher_dm(soft))
        results.append((torch.stack(rec.losses), model.state_dict()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("soft", "fused_head"),
    [(False, False), (True, False), (False, True)],
)
def test_bf16_mixed_precision_matches_torch_loss(
    tmp_path: Path, soft: bool, fused_head: bool
) -> None:
    """Under autocast (bf16-mixed, as in configs/large_vocab.yaml) the fused paths train and their
    first loss equals the torch loss on the same bf16 logits up to bf16 rounding; validation
    (the same loss call, without gradients) gives a finite loss too."""
    first = []
    for impl in ("fused", "torch"):
        seed_everything(3)
        model = Classifier(
            in_features=16,
            num_classes=300,
            hidden_sizes=[32],
            loss_impl=impl,
            fused_head=fused_head,
        )
        rec = RecordLosses()
        trainer = make_trainer(
            tmp_path,
            max_steps=3,
            callbacks=[rec],
            limit_val_batches=2,
            val_check_interval=3,
            precision="bf16-mixed",
        )
        trainer.fit(model, datamodule=_teacher_dm(soft))
        assert len(rec.losses) == 3 and all(torch.isfinite(v) for v in rec.losses)
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
        first.append(rec.losses[0])
    torch.testing.assert_close(first[0], first[1], rtol=2e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cuda_training_fused_matches_torch(tmp_path: Path, precision: str) -> None:
    """On a GPU (Triton kernel): fused and torch losses give the same first losses; the fused head
    trains on the large-vocabulary task (V = 32000)."""
    results = []
    for impl in ("fused", "torch"):
        seed_everything(11)
        model = Classifier(hidden_sizes=[64, 64], loss_impl=impl)
        rec = RecordLosses()
        trainer = make_trainer(
            tmp_path,
            accelerator="gpu",
            max_steps=20,
            max_epochs=-1,
            callbacks=[rec],
            limit_val_batches=0,
            precision=precision,
        )
        trainer.fit(model, datamodule=small_curve())
        results.append(torch.stack(rec.losses).cpu())
    tol = {"rtol": 1e-4, "atol": 1e-5} if precision == "32-true" else {"rtol": 2e-2, "atol": 1e-2}
    torch.testing.assert_close(results[0][:5], results[1][:5], **tol)

    dm = TeacherDataModule(vocab_size=32000, in_features=64, num_samples=4096, batch_size=512)
    model = Classifier(in_features=64, num_classes=32000, hidden_sizes=[256], fused_head=True)
    trainer = make_trainer(tmp_path, accelerator="gpu", max_epochs=2, precision=precision)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
