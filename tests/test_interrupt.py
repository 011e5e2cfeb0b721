"""`DeferredInterrupt`: a SIGINT stops a single-process fit at the next batch end, even where
it arrives while a finalizer runs (Python would print the KeyboardInterrupt as "ignored" there
and go on training)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from fusedce.datamodules import CurveDataModule
from fusedce.lightning_modules.interrupt import DeferredInterrupt


class _SignalInFinalizer:
    """Raises SIGINT from ``__del__``: where Python's own handler would lose it."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


class _InterruptedAt(BoringModel):
    def __init__(self, batch: int, times: int) -> None:
        super().__init__()
        self.at, self.times, self.steps_run = batch, times, 0

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        self.steps_run += 1
        if self.global_step == self.at:
            for _ in range(self.times):
                _SignalInFinalizer()  # dropped at once: __del__ runs here
        return super().training_step(batch, batch_idx)


@pytest.fixture
def sigint_handler():
    """Python's SIGINT handler before and after (Lightning ignores SIGINT after a Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _trainer(tmp_path, callbacks: list, epochs: int, batches: int, val_batches: int) -> Trainer:
    """A quiet Trainer of ``epochs`` x ``batches`` training steps."""
    return Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=val_batches,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _fit(model: BoringModel, tmp_path, callbacks: list) -> Trainer:
    """3 epochs of 8 steps, expected to be interrupted."""
    trainer = _trainer(tmp_path, callbacks, epochs=3, batches=8, val_batches=2)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after a KeyboardInterrupt
        trainer.fit(model)
    return trainer


@pytest.mark.usefixtures("sigint_handler")
def test_sigint_in_a_finalizer_stops_the_fit_at_that_batch_end(tmp_path) -> None:
    model = _InterruptedAt(batch=2, times=1)
    trainer = _fit(model, tmp_path, [DeferredInterrupt()])
    assert trainer.interrupted and trainer.global_step == 3 and model.steps_run == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the one before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("sigint_handler")
def test_without_the_callback_the_same_signal_is_lost(tmp_path) -> None:
    """Why the callback exists: Python's own handler raises inside ``__del__``, which drops it."""
    model = _InterruptedAt(batch=2, times=1)
    trainer = _trainer(tmp_path, [], epochs=1, batches=8, val_batches=0)
    trainer.fit(model)
    assert not trainer.interrupted and model.steps_run == 8


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("sigint_handler")
def test_a_second_sigint_is_not_deferred(tmp_path) -> None:
    """Two signals before a batch end: the second reaches the previous handler at once (here a
    finalizer's ``KeyboardInterrupt``, lost like any other, while the first still stops the fit)."""
    callback = DeferredInterrupt()
    model = _InterruptedAt(batch=1, times=2)
    trainer = _fit(model, tmp_path, [callback])
    assert trainer.interrupted and trainer.global_step == 2 and not callback.pending
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("sigint_handler")
def test_the_previous_handler_returns_after_a_fit(tmp_path) -> None:
    def mine(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, mine)
    trainer = _trainer(tmp_path, [DeferredInterrupt()], epochs=1, batches=2, val_batches=1)
    trainer.fit(BoringModel())
    assert signal.getsignal(signal.SIGINT) is mine


class _InterruptedAfterTraining(BoringModel):
    def on_train_end(self) -> None:
        signal.raise_signal(signal.SIGINT)  # after the last batch end: only teardown is left


@pytest.mark.usefixtures("sigint_handler")
def test_sigint_after_the_last_batch_end_is_raised_at_teardown(tmp_path) -> None:
    callback = DeferredInterrupt()
    trainer = _fit(_InterruptedAfterTraining(), tmp_path, [callback])
    assert trainer.interrupted and trainer.global_step == 3 * 8  # every step ran
    # Not this callback's handler any more (Lightning leaves SIGINT ignored after a Ctrl-C it
    # handles once its own signal handlers are torn down).
    assert signal.getsignal(signal.SIGINT) != callback._on_sigint


@pytest.mark.usefixtures("sigint_handler")
def test_an_ignored_sigint_stays_ignored(tmp_path) -> None:
    """Under nohup (SIGINT ignored) the fit installs nothing and the signal changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    model = _InterruptedAt(batch=1, times=1)
    trainer = _trainer(tmp_path, [DeferredInterrupt()], epochs=1, batches=4, val_batches=0)
    trainer.fit(model)
    assert not trainer.interrupted and model.steps_run == 4
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_data_loader_workers_outlive_a_ctrl_c() -> None:
    """The data modules' workers ignore SIGINT (a terminal's Ctrl-C reaches them too): the
    main process, which stops only at the end of the batch in flight, still gets its batches."""
    dm = CurveDataModule(num_samples=2000, batch_size=4, num_workers=2)  # > 4 prefetched
    dm.setup("fit")
    loader = dm.val_dataloader()
    batches = iter(loader)
    # A batch from each worker (they take turns): both have run their worker_init_fn, so the
    # signal below finds the handling that a started run's workers have.
    first = [next(batches) for _ in range(2)]
    for worker in batches._workers:  # the worker processes of this iterator
        os.kill(worker.pid, signal.SIGINT)
    rest = list(batches)
    assert len(rest) + 2 == len(loader) > 20 and first[0][0].shape[0] == 4
    del batches
