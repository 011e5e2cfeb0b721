"""``val/loss_gap``: how far a student is from its teacher, on the teacher task.

With a random teacher over thousands of classes, accuracy says little at small sizes (a few
samples per class: val/acc near 1 %) and ``val/loss`` has no obvious scale. The teacher's own
cross-entropy on the same validation rows (`TeacherDataModule.reference_loss`) is that scale:
``val/loss - reference`` starts near ``ln(V) - reference`` for an untrained student and goes
towards 0 as it learns the teacher's distribution (below 0 with hard labels, where a student can
be surer of the argmax than the teacher).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class TeacherGap(Callback):
    """Logs ``val/loss_gap`` = ``val/loss`` - the teacher's own validation cross-entropy after
    each training epoch's validation, where the data module has a teacher (else nothing).

    The reference is computed once, on the model's device, at the first epoch end.
    """

    def __init__(self) -> None:
        self.reference: float | None = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Logs the gap (Lightning runs the epoch's validation before this hook)."""
        dm = trainer.datamodule
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or not callable(getattr(dm, "reference_loss", None)):
            return
        if self.reference is None:
            self.reference = dm.reference_loss(pl_module.device)
        # the same on every rank (val/loss is synchronised); sync_dist says so to Lightning
        pl_module.log("val/teacher_loss", self.reference, sync_dist=True)
        pl_module.log("val/loss_gap", float(loss) - self.reference, sync_dist=True)
