"""Per-epoch scalars for TensorBoard, as PyTorch users expect: ``tensorboard --logdir runs``.

``lrlab.pipeline.train`` passes every History record to a :class:`TensorBoardScalars` through the
training loop's ``on_epoch`` callback; the event files go to ``<run>/tensorboard/``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["TAGS", "TensorBoardScalars"]

TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "lr": "lr",
    "seconds": "time/epoch_seconds",
}
"""History key -> TensorBoard tag. Other numeric keys of a record are written under their own name."""


class TensorBoardScalars:
    """Write one History record per epoch as TensorBoard scalars (step = epoch, 1-based).

    Losses are mean cross-entropy per image, accuracies top-1 fractions in [0, 1], lr the learning
    rate per optimizer step at the end of the epoch, time in seconds. Uses
    ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package); the writer is
    flushed after every epoch and closed on exit of the ``with`` block, also after an error.

    Example::

        with TensorBoardScalars(run_dir / "tensorboard") as tb:
            fit(..., on_epoch=tb)
    """

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter  # ~2 s to import: only when training

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, record: dict) -> None:
        step = int(record.get("epoch", 0))
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(TAGS.get(key, key), value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardScalars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
