"""Train / evaluate loops, the per-epoch History, and the training state of a checkpoint.

One path for every device: the caller passes a :class:`lrlab.compute.Compute` chosen once;
the loops move nothing but what the loaders yield. Learning rates are per optimizer step.
Nothing here knows file names: ``fit`` hands each epoch's state to a ``checkpoint`` callback
(``lrlab.run_folder.RunFolder.save_checkpoint`` in a run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lrlab.compute import Compute
from lrlab.tta import tta_probs

COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "train_seconds",
           "batch_size", "steps"]


@dataclass
class History:
    """Per-epoch records (keys :data:`COLUMNS`): epoch (1-based), train/test loss (mean
    cross-entropy per image), train/test top-1 accuracy in [0, 1], lr (of the reference group at
    the end of the epoch), seconds (training + evaluation wall time of that epoch),
    train_seconds (the training pass alone), batch_size (images per training batch) and steps
    (optimizer steps of the epoch).

    ``step_lrs`` holds the lr (per step, reference group) that every optimizer step of the run
    used, in order."""

    records: list[dict] = field(default_factory=list)
    step_lrs: list[float] = field(default_factory=list)

    def best(self) -> dict:
        """The record with the highest test accuracy (the earliest on ties)."""
        return max(self.records, key=lambda r: (r["test_acc"], -r["epoch"]))

    def lr_steps(self) -> list[tuple[int, int, float, int | None]]:
        """(step, epoch, lr, batch size) of every optimizer step, step 0-based, epoch 1-based."""
        rows, step = [], 0
        for r in self.records:
            for _ in range(r.get("steps") or 0):
                if step < len(self.step_lrs):
                    rows.append((step, r["epoch"], self.step_lrs[step], r.get("batch_size")))
                step += 1
        return rows

def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, schedule,
                compute: Compute, label_smoothing: float = 0.0,
                on_step: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """One pass over ``loader`` ((N, C, H, W) float32, (N,) int64 batches on the device).

    Returns (mean training loss per image, top-1 training accuracy in [0, 1]), measured on
    the augmented images. ``on_step(step, loss)`` is called after each step (for progress
    bars); reading the loss there forces a device sync, so it is optional.
    """
    model.train()
    total_loss = torch.zeros((), device=compute.device)
    total_correct = torch.zeros((), device=compute.device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(loader):
        with compute.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step_batch()
        total_loss += loss.detach() * len(y)
        total_correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if on_step is not None:
            on_step(step, loss.item())
    return total_loss.item() / seen, total_correct.item() / seen


def evaluate(model: nn.Module, loader: Iterable, compute: Compute, tta: bool = False,
             tta_shift: int = 0) -> tuple[float, float]:
    """(mean cross-entropy per image, top-1 accuracy in [0, 1]) over ``loader``.

    With ``tta`` the prediction is the mean of the softmax over the test-time augmentation
    views of :func:`lrlab.tta.tta_probs` (the image and its mirror image; with ``tta_shift``
    also both translated). Runs through :meth:`Compute.forward_batches` (eval mode, restored).
    """
    forward = (lambda m, x: tta_probs(m, x, tta_shift).clamp_min(1e-12).log()) if tta else None
    total_loss, correct, seen = 0.0, 0, 0
    for logits, y in compute.forward_batches(model, loader, forward):
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return total_loss / seen, correct / seen


def training_state(model: nn.Module, optimizer, schedule, history: History, epoch: int) -> dict:
    """Everything a checkpoint holds of the training: model, optimizer and schedule states, the
    history so far, the torch RNG state and the epoch (1-based) it ends."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "history": history.records, "rng": torch.get_rng_state(), "epoch": epoch}


class _RecordStepLR:
    """Stands in for the schedule inside the loop: records the lr each optimizer step used
    (the schedule's reference lr when ``step_batch`` is called), then steps the schedule."""

    def __init__(self, schedule, out: list[float]):
        self.schedule, self.out = schedule, out

    def step_batch(self) -> None:
        self.out.append(self.schedule.lr)
        self.schedule.step_batch()

    def step_epoch(self, test_loss: float) -> None:
        self.schedule.step_epoch(test_loss)


def fit(model: nn.Module, train_loader, test_loader, optimizer, schedule, epochs: int,
        compute: Compute, *, label_smoothing: float = 0.0, tta: bool = False, tta_shift: int = 0,
        batch_sizes: list[int] | None = None,
        checkpoint: Callable[[dict, bool], None] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> History:
    """Train for ``epochs`` epochs, evaluating on ``test_loader`` after each.

    ``batch_sizes`` (one per epoch, a batch-size schedule) is set on
    ``train_loader.batch_size`` before each epoch. The lr of every step goes to
    ``History.step_lrs``.

    Test-time augmentation (``tta``, ``tta_shift``, see :func:`evaluate`) is used for the
    final epoch only; earlier epochs are evaluated on the plain images, which costs a half
    (a sixth with shifts) of a TTA evaluation and does not change training.

    After every epoch: the schedule sees the test loss (ReduceLROnPlateau), the record is
    appended to the History, ``checkpoint(training_state(...), is_best)`` is called (is_best:
    the epoch has the best test accuracy so far) and then ``on_epoch(record)``.
    """
    history = History()
    recorder = _RecordStepLR(schedule, history.step_lrs)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        if batch_sizes is not None:
            train_loader.batch_size = batch_sizes[epoch - 1]
        steps_before = len(history.step_lrs)
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, recorder, compute,
                                            label_smoothing, on_step)
        train_seconds = time.perf_counter() - start
        test_loss, test_acc = evaluate(model, test_loader, compute, tta and epoch == epochs, tta_shift)
        schedule.step_epoch(test_loss)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                  "test_loss": test_loss, "test_acc": test_acc,
                  "lr": schedule.lr,
                  "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
                  "batch_size": getattr(train_loader, "batch_size", None),
                  "steps": len(history.step_lrs) - steps_before}
        history.records.append(record)
        if checkpoint is not None:
            checkpoint(training_state(model, optimizer, schedule, history, epoch), history.best() is record)
        if on_epoch is not None:
            on_epoch(record)
    return history
