"""Train / evaluate loops, the per-epoch History, and the training state of a checkpoint.

One path for every device: the caller passes a :class:`lrlab.compute.Compute` chosen once;
the loops move nothing but what the loaders yield. Learning rates are per optimizer step.
Nothing here knows file names: ``fit`` hands its state to a ``checkpoint`` callback
(``lrlab.run_folder.RunFolder.save_checkpoint`` in a run) and can continue from such a state,
exactly as if it had never stopped (:class:`Trainer`).
"""

from __future__ import annotations

import itertools
import math
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrlab import interrupts
from lrlab.compute import Compute
from lrlab.errors import LrlabError
from lrlab.eval_weights import eval_weights
from lrlab.tta import TTA

COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "train_seconds",
           "batch_size", "steps", "skipped_steps"]
NONFINITE_POLICIES = ("stop", "skip")
STAGE = "stage"
"""The record key of the training stage, in runs with stages only (after :data:`COLUMNS`)."""


@dataclass
class History:
    """Per-epoch records (keys :data:`COLUMNS`): epoch (1-based), train/val loss (mean
    cross-entropy per image; val: the validation split, without augmentation or TTA), train/val
    top-1 accuracy in [0, 1], lr (of the reference group at
    the end of the epoch), seconds (training + evaluation wall time of that epoch),
    train_seconds (the training pass alone), batch_size (images per training batch) and steps
    (optimizer steps of the epoch, skipped ones included), skipped_steps (steps whose loss was not
    finite and that changed nothing, ``on_nonfinite="skip"``).

    ``step_lrs`` holds the lr (per step, reference group) that every optimizer step of the run
    used, in order. ``stopped`` says why training ended before its last epoch (None: it did not):
    reason, epoch (1-based), step (0-based, as in lr_steps.csv), lr, last_finite_loss.
    ``early_stop`` says that early stopping ended training (None: it did not): reason, epoch (the
    last trained, 1-based), best_epoch, patience.

    A run in stages (:mod:`lrlab.transfer`) numbers its epochs and steps across the stages, and
    each record has ``stage`` (:data:`STAGE`: 1 head with the backbone frozen, 2 fine-tuning)."""

    records: list[dict] = field(default_factory=list)
    step_lrs: list[float] = field(default_factory=list)
    stopped: dict | None = None
    early_stop: dict | None = None

    def best(self) -> dict:
        """The record with the highest validation accuracy (the earliest on ties): the epoch of
        checkpoints/best.pt."""
        return max(self.records, key=lambda r: (r["val_acc"], -r["epoch"]))

    def stale_epochs(self) -> int:
        """Epochs since the best validation accuracy (0: the last epoch is the best; 0 without
        records)."""
        return self.records[-1]["epoch"] - self.best()["epoch"] if self.records else 0

    def lr_steps(self) -> list[tuple[int, int, float, int | None]]:
        """(step, epoch, lr, batch size) of every optimizer step, step 0-based, epoch 1-based."""
        rows, step = [], 0
        for r in self.records:
            for _ in range(r.get("steps") or 0):
                if step < len(self.step_lrs):
                    rows.append((step, r["epoch"], self.step_lrs[step], r.get("batch_size")))
                step += 1
        return rows

def evaluate(model: nn.Module, loader: Iterable, compute: Compute, tta: TTA | None = None,
             sync: Callable[..., tuple] | None = None) -> tuple[float, float]:
    """(mean cross-entropy per image, top-1 accuracy in [0, 1]) over ``loader``.

    ``sync`` (data-parallel, :func:`lrlab.distributed.all_reduce_sums`): each rank's loader
    holds its part of the split; the sums are added over the ranks, so every rank returns the
    metrics of the whole split.

    With ``tta`` the prediction is the mean of the softmax over the test-time augmentation
    views of :func:`lrlab.tta.tta_probs` (the image and its mirror image, with ``tta.shift``
    also both translated, for ``tta.fraction`` of the images). Runs through
    :meth:`Compute.forward_batches` (eval mode, restored).
    """
    forward = (lambda m, x: tta.probs(m, x).clamp_min(1e-12).log()) if tta is not None else None
    total_loss, correct, seen = 0.0, 0, 0
    for logits, y in compute.forward_batches(model, loader, forward):
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    if sync is not None:
        total_loss, correct, seen = sync(total_loss, correct, seen)
    return total_loss / seen, correct / seen




def rng_state() -> dict:
    """The global random states: torch CPU, every CUDA device, numpy and Python's ``random``, in
    types that ``torch.load(..., weights_only=True)`` reads back."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class EpochProgress:
    """Running totals of the epoch under way: optimizer steps taken (skipped ones included),
    summed loss (per image) and correct predictions over ``seen`` images, skipped steps, and
    training seconds so far."""

    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def means(self) -> tuple[float, float]:
        """(mean training loss per image, top-1 training accuracy); NaN when no step counted."""
        if self.seen == 0:
            return math.nan, math.nan
        return self.loss_sum / self.seen, self.correct / self.seen


class Trainer:
    """The training loop's state, and one optimizer step.

    Everything that decides the rest of a run is in :meth:`state_dict`: model, optimizer,
    schedule, GradScaler, gradient noise, completed epochs and the progress of the epoch under
    way (the data loader's position: its per-epoch seed is the epoch index, and the batches
    already taken are drawn again and dropped on resume), the random states and the history.
    :meth:`load_state_dict` puts all of it back, so training continues bit for bit as if it
    had not stopped.

    :attr:`weights` (:func:`lrlab.eval_weights.eval_weights`): with Schedule-Free or DoG the
    weights evaluated and saved (a checkpoint's ``model``) are not the trained ones; the loop
    switches to them before every evaluation and checkpoint (:meth:`use_eval_weights`) and back,
    exactly, before training on; the checkpoint's ``eval_weights`` holds the trained state and
    DoG's averager.

    ``on_nonfinite``: "stop" (training ends at the first step whose loss is NaN or infinite,
    before that step changes anything; ``history.stopped`` says where) or "skip" (the step
    changes nothing and is counted in the record's ``skipped_steps``).

    Data-parallel (:mod:`lrlab.distributed`): ``model`` is the ``DistributedDataParallel``
    wrapper of the network ``model.module`` (:attr:`net`: saved, loaded and evaluated) and
    ``sync`` sums numbers over the ranks (:func:`lrlab.distributed.all_reduce_sums`): every
    step's loss, correct predictions and images are those of the whole global batch on every
    rank, so the non-finite policy, the records and the schedule decide alike everywhere, and a
    signal that reached any rank stops all of them after the same step (:attr:`signal`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, compute: Compute, *,
                 label_smoothing: float = 0.0, on_nonfinite: str = "stop", grad_noise=None,
                 sync: Callable[..., tuple] | None = None):
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite {on_nonfinite!r} is not one of {NONFINITE_POLICIES}")
        self.model, self.optimizer, self.schedule, self.compute = model, optimizer, schedule, compute
        self.label_smoothing, self.on_nonfinite, self.grad_noise = label_smoothing, on_nonfinite, grad_noise
        self.scaler = compute.grad_scaler()
        self.history = History()
        self.epoch = 0  # completed epochs
        self.progress = EpochProgress()
        self.last_finite_loss: float | None = None
        self.stage: int | None = None  # written into every record when set (runs in stages)
        self.sync = sync
        self.net = model.module if sync is not None else model
        self.signal: int | None = None  # with sync: a signal pending on any rank at the last step
        self.weights = eval_weights(optimizer, self.net)  # the weights to evaluate and save (lrlab.eval_weights)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on the batch x (B, C, H, W) float32, y (B,) int64 (training mode);
        returns the loss (mean cross-entropy). A non-finite loss changes nothing: with "stop" it
        sets ``history.stopped`` and the step is not counted."""
        with self.compute.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        value, correct, n = (loss.item(), None, len(y)) if self.sync is None else self._global(loss, logits, y)
        if not math.isfinite(value):
            return self._nonfinite(value)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.weights.after_step()
        self._count(value, (logits.argmax(1) == y).sum().item() if correct is None else correct, n)
        self.last_finite_loss = value
        return value

    def _global(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """(mean loss, correct, images) of the global batch, summed over the ranks with
        :attr:`sync`, which also tells whether a signal is pending on any rank (:attr:`signal`)."""
        total, correct, n, signals = self.sync(loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y),
                                               interrupts.pending() is not None)
        self.signal = (interrupts.pending() or signal.SIGTERM) if signals else None
        return total / n, int(correct), int(n)

    def _count(self, loss: float, correct: int, n: int, skipped: int = 0) -> None:
        self.history.step_lrs.append(self.schedule.lr)
        self.schedule.step_batch()
        p = self.progress
        p.steps += 1
        p.loss_sum += loss * n
        p.correct += correct
        p.seen += n
        p.skipped += skipped

    def _nonfinite(self, value: float) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.on_nonfinite == "skip":
            self._count(0.0, 0, 0, skipped=1)
        else:
            self.history.stopped = {"reason": "non-finite training loss", "loss": str(value),
                                    "epoch": self.epoch + 1, "step": len(self.history.step_lrs),
                                    "lr": self.schedule.lr, "last_finite_loss": self.last_finite_loss}
        return value

    def use_eval_weights(self, loader) -> None:
        """Put the weights meant for evaluation and saving into the network
        (:mod:`lrlab.eval_weights`; nothing changes for most optimizers); with Schedule-Free, the
        BatchNorm statistics are then recomputed at them (:func:`_refresh_batchnorm`)."""
        w = self.weights
        if w.differs and w.trained is None:
            w.use_eval()
            if w.refresh_batchnorm:
                _refresh_batchnorm(self, loader)

    def end_epoch(self, record: dict) -> None:
        """Append the finished epoch's ``record`` and start the next epoch's totals."""
        self.history.records.append(record)
        self.epoch += 1
        self.progress = EpochProgress()

    def state_dict(self) -> dict:
        """Everything :meth:`load_state_dict` needs (loadable with ``weights_only=True``)."""
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "grad_noise": self.grad_noise.state_dict() if self.grad_noise is not None else None,
                "epoch": self.epoch, "step": len(self.history.step_lrs), "epoch_progress": vars(self.progress).copy(),
                "last_finite_loss": self.last_finite_loss, "history": list(self.history.records),
                "step_lrs": list(self.history.step_lrs), "rng": rng_state(), "eval_weights": self.weights.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (model and optimizer tensors go to their devices)."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weights.load_state_dict(state.get("eval_weights"))
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.grad_noise is not None and state.get("grad_noise") is not None:
            self.grad_noise.load_state_dict(state["grad_noise"])
        self.epoch, self.last_finite_loss = int(state["epoch"]), state["last_finite_loss"]
        self.progress = EpochProgress(**state["epoch_progress"])
        self.history = History(list(state["history"]), list(state["step_lrs"]))
        set_rng_state(state["rng"])


BN_REFRESH_BATCHES = 50
"""Training batches whose BatchNorm statistics replace the running ones at Schedule-Free's eval
weights (the schedulefree README's "Caveats": ``itertools.islice(train_loader, 50)``)."""


def _refresh_batchnorm(trainer: Trainer, loader) -> None:
    """The schedulefree README's recipe for BatchNorm: the model in training mode forwards the
    first :data:`BN_REFRESH_BATCHES` batches of the epoch under way without gradients, so the
    running statistics are those of the eval weights x instead of the training points y. The
    loader's epoch counter and the global random states (dropout) are put back afterwards, so
    training does not see it."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trainer.net.modules()):
        return
    rng, was_training, epoch = rng_state(), trainer.model.training, getattr(loader, "epoch", None)
    if epoch is not None:
        loader.epoch = trainer.epoch
    trainer.model.train()
    with torch.no_grad():
        for x, _ in itertools.islice(iter(loader), BN_REFRESH_BATCHES):
            with trainer.compute.autocast():
                trainer.model(x)
    trainer.model.train(was_training)
    if epoch is not None:
        loader.epoch = epoch
    set_rng_state(rng)


def _train_epoch(trainer: Trainer, loader, checkpoint: Callable[[dict, bool], None] | None, checkpoint_every: int,
                 on_step: Callable[[int, float], None] | None) -> None:
    """The training pass of epoch ``trainer.epoch + 1``, from the step it had reached; stops early
    at a non-finite loss ("stop") or a pending signal (checkpoint, then :class:`Interrupted`)."""
    trainer.model.train()
    trainer.weights.use_train()
    if hasattr(loader, "epoch"):
        loader.epoch = trainer.epoch  # the loader's per-epoch seed: the same order on resume
    p, start = trainer.progress, time.perf_counter() - trainer.progress.seconds
    for x, y in itertools.islice(iter(loader), p.steps, None):
        loss = trainer.step(x, y)
        if trainer.history.stopped is not None:
            return
        p.seconds = time.perf_counter() - start
        if on_step is not None:
            on_step(p.steps - 1, loss)
        signum = interrupts.pending() if trainer.sync is None else trainer.signal
        if checkpoint is not None and (signum or (checkpoint_every and len(trainer.history.step_lrs) % checkpoint_every == 0)):
            trainer.use_eval_weights(loader)
            checkpoint(trainer.state_dict(), False)
            trainer.weights.use_train()
        if signum:
            raise interrupts.Interrupted(signum, f"at epoch {trainer.epoch + 1}, step {len(trainer.history.step_lrs)}")


def fit(model: nn.Module, train_loader, val_loader, optimizer, schedule, epochs: int,
        compute: Compute, *, label_smoothing: float = 0.0,
        batch_sizes: list[int] | None = None, grad_noise=None, on_nonfinite: str = "stop",
        checkpoint: Callable[[dict, bool], None] | None = None, checkpoint_every: int = 0,
        early_stop_patience: int = 0, resume: dict | None = None, earlier: History | None = None,
        stage: int | None = None, on_step: Callable[[int, float], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None, sync: Callable[..., tuple] | None = None,
        freeze_after: dict[str, int] | None = None) -> History:
    """Train for ``epochs`` epochs, evaluating on the validation batches ``val_loader`` after each
    (see :class:`Trainer` for the step, ``on_nonfinite`` and the state a checkpoint holds). Every
    decision reads the validation split; the test split is not seen here.

    ``batch_sizes`` (one per epoch, a batch-size schedule) is set on ``train_loader.batch_size``
    before each epoch. The lr of every step goes to ``History.step_lrs``.

    After every epoch: the schedule sees the validation loss (ReduceLROnPlateau), the record is
    appended to the History, ``checkpoint(state, is_best)`` is called (is_best: the best
    validation accuracy so far, :meth:`History.best`) and then ``on_epoch(record)``; with
    ``checkpoint_every`` > 0 also ``checkpoint(state, False)`` every that many optimizer steps.
    Early stopping (Prechelt 1998, "Early stopping - but when?"): with ``early_stop_patience`` > 0,
    training ends once the validation accuracy has not improved for that many epochs
    (``History.early_stop`` says so); the decision is a function of the history alone, so a
    resumed run makes it exactly as the uninterrupted one. ``resume``: a state from an
    earlier ``checkpoint`` call to continue from (also one at the end of training: then nothing
    is trained). ``grad_noise``: the :class:`lrlab.optim.GradientNoise` attached to the optimizer,
    whose state the checkpoints carry. ``sync``: data-parallel training, ``model`` a
    ``DistributedDataParallel`` wrapper and the loaders each rank's part (see :class:`Trainer`;
    the validation metrics are summed over the ranks, :func:`evaluate`).

    ``freeze_after`` maps module names of ``model`` to epochs N: before every epoch after the
    N-th, the module's parameters get ``requires_grad=False``, so they stay as they are (no
    gradient, no optimizer update, no weight decay), and when nothing below them trains either,
    autograd skips the input gradient of the layer above (airbench94's short-lived whitening
    bias, Jordan 2024). A function of the epoch alone, so a resumed run freezes alike.

    Stages (:mod:`lrlab.transfer`): ``earlier`` is the history of the stages before this one
    (without ``resume``): its epochs and steps count, so ``epochs`` is the total of the run so
    far, epochs and steps are numbered across stages, checkpoints/best.pt is the best of the
    whole run and early stopping reads the whole history. ``stage`` goes into every record.

    Raises:
        Interrupted: a SIGINT/SIGTERM arrived while training (:mod:`lrlab.interrupts`); the step
            under way was finished and ``checkpoint`` called first.
        LrlabError: a ``freeze_after`` name that is not a module of ``model``.
    """
    trainer = Trainer(model, optimizer, schedule, compute, label_smoothing=label_smoothing,
                      on_nonfinite=on_nonfinite, grad_noise=grad_noise, sync=sync)
    if resume is not None:
        trainer.load_state_dict(resume)
    elif earlier is not None:
        trainer.history = History(list(earlier.records), list(earlier.step_lrs))
        trainer.epoch = len(earlier.records)
    trainer.stage = stage
    with interrupts.deferring():
        while trainer.epoch < epochs:
            if early_stop_patience and trainer.history.stale_epochs() >= early_stop_patience:
                h = trainer.history
                h.early_stop = {"reason": f"the validation accuracy did not improve for {early_stop_patience} epochs",
                                "epoch": trainer.epoch, "best_epoch": h.best()["epoch"],
                                "patience": early_stop_patience}
                break
            epoch = trainer.epoch + 1
            freeze_due(model.module if sync is not None else model, freeze_after or {}, trainer.epoch)
            if batch_sizes is not None:
                train_loader.batch_size = batch_sizes[epoch - 1]
            _train_epoch(trainer, train_loader, checkpoint, checkpoint_every, on_step)
            if trainer.history.stopped is not None:
                break
            _end_epoch(trainer, epoch, val_loader, train_loader, checkpoint, on_epoch)
    return trainer.history


def modules_to_freeze(model: nn.Module, freeze_after: dict[str, int]) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``freeze_after`` (``train.freeze_after``: module name -> epochs)
    names, by name (see :func:`fit`).

    Raises:
        LrlabError: a name that is not a module of ``model`` (the error lists the top-level ones).
    """
    modules = {}
    for name in freeze_after:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            valid = ", ".join(n for n, _ in model.named_children())
            raise LrlabError(f"train.freeze_after names {name!r}, which is not a module of the model; "
                             f"top-level modules: {valid}") from None
    return modules


def freeze_due(model: nn.Module, freeze_after: dict[str, int], epochs_done: int) -> None:
    """Freeze (``requires_grad=False``) every module of ``freeze_after`` whose N epochs are done
    (``epochs_done >= N``); see :func:`fit`. Raises as :func:`modules_to_freeze`."""
    for name, module in modules_to_freeze(model, freeze_after).items():
        if epochs_done >= freeze_after[name]:
            module.requires_grad_(False)


def _end_epoch(trainer: Trainer, epoch: int, val_loader, train_loader, checkpoint, on_epoch) -> None:
    """Evaluate the eval weights (:meth:`Trainer.use_eval_weights`) on the validation split, step
    the schedule on its loss, record, checkpoint, report; then raise :class:`Interrupted` if a
    signal came meanwhile."""
    start = time.perf_counter()
    p, batch_size = trainer.progress, getattr(train_loader, "batch_size", None)
    trainer.use_eval_weights(train_loader)
    val_loss, val_acc = evaluate(trainer.net, val_loader, trainer.compute, sync=trainer.sync)
    trainer.schedule.step_epoch(val_loss)
    train_loss, train_acc = p.means()
    record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
              "val_acc": val_acc, "lr": trainer.schedule.lr, "seconds": p.seconds + time.perf_counter() - start,
              "train_seconds": p.seconds, "batch_size": batch_size, "steps": p.steps, "skipped_steps": p.skipped}
    if trainer.stage is not None:
        record[STAGE] = trainer.stage
    trainer.end_epoch(record)
    if checkpoint is not None:
        checkpoint(trainer.state_dict(), trainer.history.best() is record)
    if on_epoch is not None:
        on_epoch(record)
    signum = interrupts.pending()
    if trainer.sync is not None:  # stop on every rank or on none
        signum = (signum or signal.SIGTERM) if trainer.sync(signum is not None)[0] else None
    if signum:
        raise interrupts.Interrupted(signum, f"after epoch {epoch}")
