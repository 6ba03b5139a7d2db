"""Train / evaluate loops, the per-epoch History, and checkpoints.

One path for every device: the caller picks the device and autocast dtype once; the
loops move nothing but what the loaders yield. Learning rates are per optimizer step.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lrlab.compute import autocast, retain_freed_memory
from lrlab.io import atomic_path, atomic_write_text, write_json
from lrlab.tta import tta_probs

COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "batch_size", "steps"]


@dataclass
class History:
    """Per-epoch records: epoch (1-based), train/test loss (mean cross-entropy per image),
    train/test top-1 accuracy in [0, 1], lr (at the end of the epoch), seconds
    (training + evaluation wall time of that epoch), batch_size (images per training batch)
    and steps (optimizer steps of the epoch).

    ``step_lrs`` holds the lr (per step) that every optimizer step of the run used, in order;
    it is saved as ``lr_steps.csv`` (step, epoch, lr, batch_size)."""

    records: list[dict] = field(default_factory=list)
    step_lrs: list[float] = field(default_factory=list)

    def best(self) -> dict:
        """The record with the highest test accuracy (the earliest on ties)."""
        return max(self.records, key=lambda r: (r["test_acc"], -r["epoch"]))

    def save(self, run_dir: Path) -> None:
        """Write ``history.csv`` and ``history.json`` into ``run_dir`` (atomic)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(run_dir / "history.csv", buf.getvalue())
        write_json(run_dir / "history.json", self.records)
        if self.step_lrs:
            lines, step = ["step,epoch,lr,batch_size"], 0
            for r in self.records:
                for _ in range(r.get("steps") or 0):
                    if step < len(self.step_lrs):
                        lines.append(f"{step},{r['epoch']},{self.step_lrs[step]!r},{r.get('batch_size', '')}")
                    step += 1
            atomic_write_text(run_dir / "lr_steps.csv", "\n".join(lines) + "\n")


@dataclass
class Precision:
    """Where and how the loops compute: device, autocast dtype (None: float32) and layout."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (float32 weights) in the chosen memory format; on a
        CPU also keep freed memory in the process (:func:`lrlab.compute.retain_freed_memory`)."""
        if self.device.type == "cpu":
            retain_freed_memory()
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def autocast(self):
        return autocast(self.device, self.dtype)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, schedule,
                precision: Precision, label_smoothing: float = 0.0,
                on_step: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """One pass over ``loader`` ((N, C, H, W) float32, (N,) int64 batches on the device).

    Returns (mean training loss per image, top-1 training accuracy in [0, 1]), measured on
    the augmented images. ``on_step(step, loss)`` is called after each step (for progress
    bars); reading the loss there forces a device sync, so it is optional.
    """
    model.train()
    total_loss = torch.zeros((), device=precision.device)
    total_correct = torch.zeros((), device=precision.device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(loader):
        with precision.autocast():
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


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision, tta: bool = False,
             tta_shift: int = 0) -> tuple[float, float]:
    """(mean cross-entropy per image, top-1 accuracy in [0, 1]) over ``loader``.

    With ``tta`` the prediction is the mean of the softmax over the test-time augmentation
    views of :func:`lrlab.tta.tta_probs` (the image and its mirror image; with ``tta_shift``
    also both translated). Restores the model's train/eval mode.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        with precision.autocast():
            if tta:
                logits = tta_probs(model, x, tta_shift).clamp_min(1e-12).log()
            else:
                logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    model.train(was_training)
    return total_loss / seen, correct / seen


def save_checkpoint(path: Path, model: nn.Module, optimizer, schedule, history: History, extra: dict) -> None:
    """Save everything needed to resume or explain: model, optimizer and schedule states,
    the history so far, the torch RNG state and ``extra`` (config, classes, mean/std)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "history": history.records,
             "rng": torch.get_rng_state(), **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class _RecordStepLR:
    """Stands in for the schedule inside the loop: records the lr each optimizer step used
    (the optimizer's lr when ``step_batch`` is called), then steps the schedule."""

    def __init__(self, schedule, optimizer, out: list[float]):
        self.schedule, self.optimizer, self.out = schedule, optimizer, out

    def step_batch(self) -> None:
        self.out.append(self.optimizer.param_groups[0]["lr"])
        self.schedule.step_batch()

    def step_epoch(self, test_loss: float) -> None:
        self.schedule.step_epoch(test_loss)


def fit(model: nn.Module, train_loader, test_loader, optimizer, schedule, epochs: int,
        precision: Precision, *, label_smoothing: float = 0.0, tta: bool = False, tta_shift: int = 0,
        checkpoint_dir: Path | None = None, checkpoint_extra: dict | None = None,
        on_step: Callable[[int, float], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        batch_sizes: list[int] | None = None) -> History:
    """Train for ``epochs`` epochs, evaluating on ``test_loader`` after each.

    ``batch_sizes`` (one per epoch, a batch-size schedule) is set on
    ``train_loader.batch_size`` before each epoch. The lr of every step goes to
    ``History.step_lrs``.

    Test-time augmentation (``tta``, ``tta_shift``, see :func:`evaluate`) is used for the
    final epoch only; earlier epochs are evaluated on the plain images, which costs a half
    (a sixth with shifts) of a TTA evaluation and does not change training.

    After every epoch: the schedule sees the test loss (ReduceLROnPlateau), the record is
    appended to the History and passed to ``on_epoch``, and ``checkpoint_dir/last.pt``
    (and ``best.pt`` when the test accuracy is a new best) are written atomically.
    """
    history = History()
    recorder = _RecordStepLR(schedule, optimizer, history.step_lrs)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        if batch_sizes is not None:
            train_loader.batch_size = batch_sizes[epoch - 1]
        steps_before = len(history.step_lrs)
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, recorder, precision,
                                            label_smoothing, on_step)
        final = epoch == epochs
        test_loss, test_acc = evaluate(model, test_loader, precision, tta and final, tta_shift)
        schedule.step_epoch(test_loss)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                  "test_loss": test_loss, "test_acc": test_acc,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start,
                  "batch_size": getattr(train_loader, "batch_size", None),
                  "steps": len(history.step_lrs) - steps_before}
        history.records.append(record)
        if checkpoint_dir is not None:
            extra = {"epoch": epoch, **(checkpoint_extra or {})}
            save_checkpoint(checkpoint_dir / "last.pt", model, optimizer, schedule, history, extra)
            if history.best() is record:  # the same state: copy the file rather than serialise twice
                with atomic_path(checkpoint_dir / "best.pt") as tmp:
                    shutil.copyfile(checkpoint_dir / "last.pt", tmp)
        if on_epoch is not None:
            on_epoch(record)
    return history
