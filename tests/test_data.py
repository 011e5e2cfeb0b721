"""Data modules: labels, determinism, splits, label noise, teacher targets, validation."""

from __future__ import annotations

import pytest
import torch

from fusedce.datamodules import CurveDataModule, TeacherDataModule, band_labels


def test_band_labels_two_classes_is_the_curve_task_label() -> None:
    x = torch.rand(10_000, 2, generator=torch.Generator().manual_seed(1))
    y = band_labels(x, 2)
    assert torch.equal(y, (x[:, 1] > x[:, 0] ** 2).long())


def test_band_labels_k_classes_count_curves_below() -> None:
    # K = 4: curves x2 = c x1^2 with c = 0.5, 1.0, 1.5.
    x = torch.tensor([[1.0, 0.4], [1.0, 0.7], [1.0, 0.99], [0.5, 0.9], [0.0, 0.0]])
    assert band_labels(x, 4).tolist() == [0, 1, 1, 3, 0]
    big = torch.rand(20_000, 2, generator=torch.Generator().manual_seed(0))
    labels = band_labels(big, 5)
    assert labels.min() == 0 and labels.max() == 4
    assert len(labels.unique()) == 5


def test_curve_splits_are_deterministic_and_disjoint() -> None:
    a = CurveDataModule(num_samples=1000, val_fraction=0.2, test_fraction=0.1, seed=3)
    b = CurveDataModule(num_samples=1000, val_fraction=0.2, test_fraction=0.1, seed=3)
    c = CurveDataModule(num_samples=1000, val_fraction=0.2, test_fraction=0.1, seed=4)
    sa, sb, sc = a.generate(), b.generate(), c.generate()
    for name in ("train", "val", "test"):
        assert torch.equal(sa[name][0], sb[name][0]) and torch.equal(sa[name][1], sb[name][1])
    assert not torch.equal(sa["train"][0], sc["train"][0])
    assert [len(sa[n][0]) for n in ("train", "val", "test")] == [700, 200, 100]
    allx = torch.cat([sa[n][0] for n in ("train", "val", "test")])
    assert len(torch.unique(allx, dim=0)) == 1000
    assert float(allx.min()) >= 0.0 and float(allx.max()) <= 1.0
    # noise-free: labels follow the curve
    for name in ("train", "val", "test"):
        x, y = sa[name]
        assert torch.equal(y, band_labels(x, 2))


def test_curve_dataloaders_shapes_and_batch_size() -> None:
    dm = CurveDataModule(num_samples=500, batch_size=64, num_classes=3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 2) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert sum(len(b[0]) for b in dm.val_dataloader()) == 100
    assert dm.num_classes == 3 and dm.in_features == 2


def test_label_noise_only_on_train_and_at_the_requested_rate() -> None:
    dm = CurveDataModule(num_samples=20_000, label_noise=0.2, num_classes=3, seed=5)
    splits = dm.generate()
    x, y = splits["train"]
    wrong = (y != band_labels(x, 3)).float().mean().item()
    assert wrong == pytest.approx(0.2, abs=0.015)
    for name in ("val", "test"):
        xv, yv = splits[name]
        assert torch.equal(yv, band_labels(xv, 3))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": 0.0},
        {"val_fraction": 1.0},
        {"val_fraction": 1.5},
        {"val_fraction": -0.1},
        {"test_fraction": 1.0},
        {"val_fraction": 0.6, "test_fraction": 0.5},
        {"num_classes": 1},
        {"num_samples": 0},
        {"num_samples": 2},
        {"batch_size": 0},
        {"label_noise": 1.0},
        {"label_noise": -0.1},
        {"num_workers": -1},
    ],
)
def test_curve_invalid_settings_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        CurveDataModule(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vocab_size": 1},
        {"in_features": 0},
        {"num_samples": 0},
        {"val_fraction": 1.0},
        {"temperature": 0.0},
        {"logit_scale": -1.0},
        {"batch_size": 0},
    ],
)
def test_teacher_invalid_settings_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TeacherDataModule(**kwargs)


def _teacher_batch(soft: bool, **kwargs) -> tuple[TeacherDataModule, torch.Tensor, torch.Tensor]:
    dm = TeacherDataModule(
        vocab_size=1000, in_features=16, num_samples=400, batch_size=32, soft_targets=soft, **kwargs
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer(batch, 0)
    return dm, x, y


def test_teacher_hard_and_soft_targets_agree() -> None:
    _, x, y_hard = _teacher_batch(False, seed=1)
    dm, _, p = _teacher_batch(True, seed=1)
    assert x.shape == (32, 16) and y_hard.shape == (32,) and y_hard.dtype == torch.int64
    assert p.shape == (32, 1000) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(32))
    # the same features (same seed, unshuffled view) give argmax(P) == hard label
    p_of_x = dm.teacher_targets(x)
    assert torch.equal(p_of_x.argmax(-1), y_hard)
    assert dm.num_classes == 1000 and dm.in_features == 16


def test_teacher_is_deterministic_and_temperature_flattens() -> None:
    a = TeacherDataModule(vocab_size=500, in_features=8, num_samples=100, soft_targets=True)
    b = TeacherDataModule(vocab_size=500, in_features=8, num_samples=100, soft_targets=True)
    hot = TeacherDataModule(
        vocab_size=500, in_features=8, num_samples=100, soft_targets=True, temperature=4.0
    )
    for dm in (a, b, hot):
        dm.setup()
    x = a.val_set.tensors[0]
    assert torch.equal(x, b.val_set.tensors[0])
    pa, pb, ph = a.teacher_targets(x), b.teacher_targets(x), hot.teacher_targets(x)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)

    def entropy(p: torch.Tensor) -> float:
        return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())

    assert entropy(ph) > entropy(pa) + 0.5
    assert entropy(pa) < torch.log(torch.tensor(500.0)).item() - 0.5  # not uniform


def test_teacher_stores_features_only() -> None:
    dm = TeacherDataModule(vocab_size=50_000, in_features=8, num_samples=1000)
    dm.setup()
    stored = sum(t.numel() for ds in (dm.train_set, dm.val_set, dm.test_set) for t in ds.tensors)
    assert stored == 1000 * 8
