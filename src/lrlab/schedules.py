"""Learning-rate (and batch-size) schedules, stepped by the training loop.

Every schedule has ``step_batch()`` (called after each optimizer step) and
``step_epoch(test_loss)`` (called after each epoch's evaluation); each ignores the call it
does not use, so the loop needs no per-schedule branches. Learning rates are per optimizer
step and apply to every parameter group; ``lr_at(step)`` gives the lr of optimizer step
``step`` (0-based, counted over the whole run).

Per-step vs per-epoch is handled inside: ``constant``, ``cosine``, ``onecycle``, ``cyclic``
and the warm-up change the lr at every step; ``step``, ``multistep`` and ``exponential`` change
it at epoch boundaries (as ``torch.optim.lr_scheduler`` does when stepped once per epoch);
``plateau`` and ``plateau_detect`` change it after an epoch's test loss. Epochs may have
different numbers of steps (a batch-size schedule), so every schedule reads time through a
:class:`Clock` built from the steps of each epoch.

ReduceLROnPlateau (``plateau``) is torch's, with torch's semantics. How they differ from Keras'
``ReduceLROnPlateau`` (checked against both sources):

* patience: torch cuts when the number of epochs without improvement exceeds ``patience``,
  i.e. after patience + 1 flat epochs; Keras counts ``wait`` and cuts when
  ``wait >= patience``, i.e. after patience flat epochs. Keras patience p = torch patience p - 1.
* improvement: torch (threshold_mode "rel", used here) needs loss < best x (1 - threshold);
  Keras' ``min_delta`` is absolute: loss < best - min_delta.
* cooldown: after a cut torch ignores the next ``cooldown`` epochs (the counter is decremented
  after the epoch is counted, which is then reset); Keras decrements first, so the epoch on
  which its counter reaches 0 is already counted: Keras cooldown c ignores c - 1 epochs
  (cooldown 1 has no effect there).
* min_lr: torch sets max(lr x factor, min_lr) when that lowers the lr by more than 1e-8;
  Keras cuts only while lr > min_lr. Both keep ``best`` across a cut.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch

from lrlab.errors import LrlabError
from lrlab.plateau import find_plateaus

SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "plateau", "plateau_detect",
             "onecycle", "cyclic")
PEAK_SCHEDULES = ("onecycle", "cyclic")  # their lr is a peak: train.max_lr or the range test's
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Clock:
    """Maps a global optimizer step to epochs when epochs have different numbers of steps.

    Args:
        steps_per_epoch: optimizer steps of each epoch (a list, one per epoch), or one int
            for every epoch together with ``epochs``.
        epochs: number of epochs when ``steps_per_epoch`` is an int.
    """

    def __init__(self, steps_per_epoch: int | Sequence[int], epochs: int | None = None):
        if isinstance(steps_per_epoch, int):
            steps_per_epoch = [steps_per_epoch] * (epochs or 1)
        self.steps = [int(s) for s in steps_per_epoch]
        if not self.steps or min(self.steps) < 1:
            raise LrlabError(f"every epoch needs at least one optimizer step, got steps per epoch {self.steps}")
        self.bounds = [0]
        for s in self.steps:
            self.bounds.append(self.bounds[-1] + s)

    @property
    def epochs(self) -> int:
        return len(self.steps)

    @property
    def total_steps(self) -> int:
        return self.bounds[-1]

    def epoch(self, step: int) -> int:
        """0-based epoch of optimizer step ``step`` (steps past the end count on, at the last
        epoch's length)."""
        if step >= self.total_steps:
            return self.epochs + (step - self.total_steps) // self.steps[-1]
        return bisect.bisect_right(self.bounds, step) - 1

    def position(self, step: int) -> float:
        """Epochs elapsed before optimizer step ``step``: epoch + fraction of it done."""
        e = min(self.epoch(step), self.epochs - 1)
        return e + (step - self.bounds[e]) / self.steps[e]

    def steps_until(self, position: float) -> int:
        """Number of steps whose :meth:`position` is below ``position`` (in epochs)."""
        e = int(position)
        if e >= self.epochs:
            return self.total_steps
        return self.bounds[e] + math.ceil((position - e) * self.steps[e] - 1e-9)


class Schedule:
    """Base class: the lr of optimizer step ``step`` is ``lr_at(step)``; ``step_count`` is the
    number of optimizer steps taken. Subclasses set the optimizer's lr in ``__init__``."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """The lr of the next optimizer step."""
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        set_lr(self.optimizer, self.lr)

    def step_batch(self) -> None:
        self.step_count += 1
        self._apply()

    def step_epoch(self, test_loss: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply()


class Constant(Schedule):
    """A fixed learning rate ``lr`` (per step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float):
        super().__init__(optimizer)
        self.base_lr = lr
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr


class StepDecay(Schedule):
    """Step decay, per epoch: lr x gamma^floor(epoch / step_size), epoch 0-based (torch StepLR)."""

    def __init__(self, optimizer, lr: float, step_size: int, gamma: float, clock: Clock):
        super().__init__(optimizer)
        self.base_lr, self.step_size, self.gamma, self.clock = lr, step_size, gamma, clock
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** (self.clock.epoch(step) // self.step_size)


class MultiStep(Schedule):
    """Multi-step decay, per epoch: lr x gamma^(milestones <= epoch), epoch 0-based
    (torch MultiStepLR): milestones [5, 8] decay from the 6th and the 9th epoch on."""

    def __init__(self, optimizer, lr: float, milestones: Sequence[int], gamma: float, clock: Clock):
        super().__init__(optimizer)
        self.base_lr, self.milestones, self.gamma, self.clock = lr, sorted(milestones), gamma, clock
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, self.clock.epoch(step))


class Exponential(Schedule):
    """Exponential decay, per epoch: lr x gamma^epoch, epoch 0-based (torch ExponentialLR)."""

    def __init__(self, optimizer, lr: float, gamma: float, clock: Clock):
        super().__init__(optimizer)
        self.base_lr, self.gamma, self.clock = lr, gamma, clock
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** self.clock.epoch(step)


class Cosine(Schedule):
    """Cosine annealing per step (Loshchilov & Hutter, SGDR, arXiv:1608.03983, one cycle,
    no restart): min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2 for step t of T total."""

    def __init__(self, optimizer, lr: float, total_steps: int, min_lr: float = 0.0):
        super().__init__(optimizer)
        self.base_lr, self.total_steps, self.min_lr = lr, total_steps, min_lr
        self._apply()

    def lr_at(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2


class OneCycle(Schedule):
    """One-cycle policy (Smith & Topin 2017, arXiv:1708.07120), linear in both phases.

    The lr (per step) rises linearly from ``max_lr / div`` to ``max_lr`` over the first
    ``warmup_pct`` of ``total_steps`` optimizer steps (the peak is step
    round(warmup_pct x (total_steps - 1))), then falls linearly to ``max_lr / final_div`` at
    the last step. With a batch-size schedule ``total_steps`` is the sum over the epochs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int,
                 warmup_pct: float = 0.25, div: float = 10.0, final_div: float = 1e3):
        if total_steps < 2:
            raise LrlabError(f"one-cycle needs at least 2 steps, got total_steps={total_steps}")
        super().__init__(optimizer)
        self.max_lr, self.total_steps = max_lr, total_steps
        self.peak = max(1, round(warmup_pct * (total_steps - 1)))
        self.div, self.final_div = div, final_div
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        lo, hi, end = self.max_lr / self.div, self.max_lr, self.max_lr / self.final_div
        step = min(step, self.total_steps - 1)
        if step <= self.peak:
            return lo + (hi - lo) * step / self.peak
        return hi + (end - hi) * (step - self.peak) / (self.total_steps - 1 - self.peak)


class Cyclic(Schedule):
    """Cyclical learning rates (Smith 2015, arXiv:1506.01186), per step.

    With p the epochs elapsed (:meth:`Clock.position`), c = floor(p / cycle_epochs) the cycle
    and x = |2 (p / cycle_epochs - c) - 1|, the lr is
    base_lr + (max_lr - base_lr) x (1 - x) x scale: it starts at base_lr, reaches max_lr in the
    middle of each cycle and is back at base_lr after ``cycle_epochs`` epochs (the paper's
    stepsize is half a cycle). scale is 1 (triangular), 1 / 2^c (triangular2, the amplitude
    halves every cycle) or gamma^p (exp_range; the paper's exponent counts iterations, here
    epochs, so that gamma does not depend on the batch size).

    Raises:
        LrlabError: base_lr >= max_lr or an unknown mode.
    """

    def __init__(self, optimizer, base_lr: float, max_lr: float, cycle_epochs: float, clock: Clock,
                 mode: str = "triangular", gamma: float = 1.0):
        if base_lr >= max_lr:
            raise LrlabError(f"cyclic base_lr ({base_lr:g}) must be below max_lr ({max_lr:g}); lower "
                             f"train.cyclic.base_lr or raise train.max_lr")
        if mode not in CYCLIC_MODES:
            raise LrlabError(f"unknown train.cyclic.mode {mode!r}; valid modes: {', '.join(CYCLIC_MODES)}")
        super().__init__(optimizer)
        self.base_lr, self.max_lr, self.cycle_epochs = base_lr, max_lr, cycle_epochs
        self.clock, self.mode, self.gamma = clock, mode, gamma
        self._apply()

    def lr_at(self, step: int) -> float:
        p = self.clock.position(step)
        u = p / self.cycle_epochs
        cycle = math.floor(u)
        height = 1.0 - abs(2.0 * (u - cycle) - 1.0)
        if self.mode == "triangular2":
            height /= 2.0 ** cycle
        elif self.mode == "exp_range":
            height *= self.gamma ** p
        return self.base_lr + (self.max_lr - self.base_lr) * height


class Plateau(Schedule):
    """ReduceLROnPlateau on the test loss: ``torch.optim.lr_scheduler.ReduceLROnPlateau`` with
    mode "min" and threshold_mode "rel", so torch's semantics exactly (see the module
    docstring for how they differ from Keras').

    The lr is multiplied by ``factor`` once the test loss has not improved on the best so far
    by a relative ``threshold`` for more than ``patience`` epochs, never below ``min_lr``;
    ``cooldown`` epochs after a cut are not counted. torch's scheduler drives a one-parameter
    shadow optimizer, so a warm-up in front can own the real optimizer's lr meanwhile.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, factor: float = 0.1,
                 patience: int = 3, threshold: float = 1e-4, min_lr: float = 0.0, cooldown: int = 0):
        super().__init__(optimizer)
        self._shadow = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._shadow, mode="min", factor=factor, patience=patience, threshold=threshold,
            threshold_mode="rel", cooldown=cooldown, min_lr=min_lr)
        self._apply()

    def lr_at(self, step: int) -> float:
        return self._shadow.param_groups[0]["lr"]

    def step_epoch(self, test_loss: float) -> None:
        self.inner.step(test_loss)
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "plateau": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["plateau"])
        self._shadow.param_groups[0]["lr"] = state["lr"]
        super().load_state_dict(state)


class PlateauDetect(Schedule):
    """lrlab's plateau policy: after each epoch, :func:`lrlab.plateau.find_plateaus` runs on
    the test losses so far; when the last epoch closes a plateau (``window`` epochs whose best
    loss improves on the best before them by less than ``rel_threshold``, relative) the lr is
    multiplied by ``factor`` (not below ``min_lr``). After a cut the policy waits ``window``
    epochs before it may cut again. ``cuts`` lists the 0-based epochs of the cuts.
    """

    def __init__(self, optimizer, lr: float, window: int = 3, rel_threshold: float = 0.01,
                 factor: float = 0.1, min_lr: float = 0.0):
        super().__init__(optimizer)
        self.current, self.window, self.rel_threshold = lr, window, rel_threshold
        self.factor, self.min_lr = factor, min_lr
        self.losses: list[float] = []
        self.cuts: list[int] = []
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.current

    def step_epoch(self, test_loss: float) -> None:
        self.losses.append(float(test_loss))
        i = len(self.losses) - 1
        spans = find_plateaus(self.losses, self.window, self.rel_threshold)
        recent = bool(self.cuts) and i - self.cuts[-1] < self.window
        if spans and spans[-1][1] == i and not recent:
            self.current = max(self.current * self.factor, self.min_lr)
            self.cuts.append(i)
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.current, "losses": self.losses, "cuts": self.cuts}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.losses, self.cuts = state["lr"], list(state["losses"]), list(state["cuts"])
        super().load_state_dict(state)


class Warmup(Schedule):
    """Linear warm-up in front of any schedule (Goyal et al. 2017, arXiv:1706.02677).

    For the first ``warmup_steps`` optimizer steps t = 0 .. W-1 the lr is
    target x (t + 1) / W, where target is the wrapped schedule's lr at step W; from step W on
    the wrapped schedule's own lr is used. The wrapped schedule keeps its own clock (the
    warm-up replaces its first W steps rather than delaying it), so milestones stay at the
    epochs the recipe names and the run keeps its length.
    """

    def __init__(self, inner: Schedule, warmup_steps: int):
        if warmup_steps < 1:
            raise LrlabError(f"a warm-up needs at least one step, got {warmup_steps}")
        super().__init__(inner.optimizer)
        self.inner, self.warmup_steps = inner, warmup_steps
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.inner.lr_at(self.warmup_steps) * (step + 1) / self.warmup_steps
        return self.inner.lr_at(step)

    def step_batch(self) -> None:
        self.inner.step_batch()
        super().step_batch()

    def step_epoch(self, test_loss: float) -> None:
        self.inner.step_epoch(test_loss)
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        super().load_state_dict(state)


def batch_sizes(train_cfg) -> list[int]:
    """Batch size of each epoch under the batch-size schedule (Smith et al. 2017, "Don't decay
    the learning rate, increase the batch size", arXiv:1711.00489): ``train.batch_size`` x
    ``batch_size_factor``^(milestones <= epoch), rounded, epoch 0-based (like multistep)."""
    ms = sorted(train_cfg.batch_size_milestones)
    return [round(train_cfg.batch_size * train_cfg.batch_size_factor ** bisect.bisect_right(ms, e))
            for e in range(train_cfg.epochs)]


def check_lr_source(train_cfg, range_test_runs: bool) -> None:
    """Raise before any work when a one-cycle or cyclic schedule would have no peak lr.

    Raises:
        LrlabError: ``train.max_lr`` unset and the range test not run.
    """
    if train_cfg.schedule in PEAK_SCHEDULES and train_cfg.max_lr is None and not range_test_runs:
        raise LrlabError(f"train.schedule {train_cfg.schedule!r} needs a max_lr: set train.max_lr or let "
                         f"the range test find it (lr_finder.enabled=true, the run command)")


def schedule_lr(train_cfg, found_lr: float | None) -> float:
    """The lr a schedule is built with: the peak (``train.max_lr``, else the range test's
    ``found_lr``) for onecycle and cyclic; the initial lr (``found_lr``, else ``train.lr``)
    for the others.

    Raises:
        LrlabError: onecycle or cyclic with neither ``train.max_lr`` nor ``found_lr``.
    """
    if train_cfg.schedule in PEAK_SCHEDULES:
        check_lr_source(train_cfg, found_lr is not None)
        peak = train_cfg.max_lr if train_cfg.max_lr is not None else found_lr
        base = train_cfg.cyclic.base_lr
        if train_cfg.schedule == "cyclic" and base is not None and base >= peak:
            raise LrlabError(f"train.cyclic.base_lr ({base:g}) must be below the cyclic max_lr ({peak:g}, "
                             f"{'train.max_lr' if train_cfg.max_lr is not None else 'from the range test'})")
        return peak
    return found_lr if found_lr is not None else train_cfg.lr


def check_batch_sizes(train_cfg, train_images: int) -> None:
    """Raise when the batch-size schedule asks for a batch larger than the training set
    (the loader drops the last incomplete batch, so an epoch would have no step).

    Raises:
        LrlabError: naming the batch size, its epoch and the number of images.
    """
    for epoch, bs in enumerate(batch_sizes(train_cfg)):
        if bs > train_images:
            raise LrlabError(f"train.batch_size {bs} at epoch {epoch + 1} is larger than the {train_images} "
                             f"training images; lower train.batch_size or train.batch_size_factor, or "
                             f"move train.batch_size_milestones")


def build_schedule(train_cfg, optimizer: torch.optim.Optimizer, lr: float,
                   steps_per_epoch: int | Sequence[int]) -> Schedule:
    """The schedule named by ``train_cfg.schedule``, with a linear warm-up in front when
    ``train_cfg.warmup_epochs`` > 0.

    Args:
        train_cfg: a ``lrlab.config.TrainConfig``.
        optimizer: its param groups' lr is set at once and after every step/epoch.
        lr: the peak lr (onecycle, cyclic: max_lr) or the initial lr (the others), per step.
        steps_per_epoch: optimizer steps per epoch: one int, or one per epoch when a
            batch-size schedule changes it.

    Raises:
        LrlabError: an unknown schedule name (the valid ones are listed) or invalid values.
    """
    name, epochs = train_cfg.schedule, train_cfg.epochs
    clock = Clock(steps_per_epoch, epochs) if isinstance(steps_per_epoch, int) else Clock(steps_per_epoch)
    if name == "constant":
        schedule = Constant(optimizer, lr)
    elif name == "step":
        schedule = StepDecay(optimizer, lr, train_cfg.step.step_size, train_cfg.step.gamma, clock)
    elif name == "multistep":
        ms = train_cfg.multistep.milestones or [round(0.5 * epochs), round(0.75 * epochs)]
        schedule = MultiStep(optimizer, lr, ms, train_cfg.multistep.gamma, clock)
    elif name == "exponential":
        schedule = Exponential(optimizer, lr, train_cfg.exponential.gamma, clock)
    elif name == "cosine":
        schedule = Cosine(optimizer, lr, clock.total_steps, train_cfg.cosine.min_lr)
    elif name == "plateau":
        p = train_cfg.plateau
        schedule = Plateau(optimizer, lr, p.factor, p.patience, p.threshold, p.min_lr, p.cooldown)
    elif name == "plateau_detect":
        p = train_cfg.plateau_detect
        schedule = PlateauDetect(optimizer, lr, p.window, p.rel_threshold, p.factor, p.min_lr)
    elif name == "onecycle":
        schedule = OneCycle(optimizer, lr, clock.total_steps, train_cfg.warmup_pct)
    elif name == "cyclic":
        c = train_cfg.cyclic
        base = c.base_lr if c.base_lr is not None else lr / 4
        schedule = Cyclic(optimizer, base, lr, c.cycle_epochs, clock, c.mode, c.gamma)
    else:
        raise LrlabError(f"unknown train.schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    if train_cfg.warmup_epochs > 0:
        schedule = Warmup(schedule, max(1, clock.steps_until(train_cfg.warmup_epochs)))
    return schedule
