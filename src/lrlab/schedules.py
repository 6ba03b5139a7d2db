"""Learning-rate (and batch-size) schedules, stepped by the training loop.

Every schedule has ``step_batch()`` (called after each optimizer step) and
``step_epoch(val_loss)`` (called after each epoch's evaluation); each ignores the call it
does not use, so the loop needs no per-schedule branches. Learning rates are per optimizer
step and apply to every parameter group; ``lr_at(step)`` gives the lr of optimizer step
``step`` (0-based, counted over the whole run).

Per-step vs per-epoch is handled inside: ``constant``, ``cosine``, ``onecycle``, ``cyclic``
and the warm-up change the lr at every step; ``step``, ``multistep`` and ``exponential`` change
it at epoch boundaries (as ``torch.optim.lr_scheduler`` does when stepped once per epoch);
``plateau`` and ``plateau_detect`` change it after an epoch's validation loss. Epochs may have
different numbers of steps (a batch-size schedule), so every schedule reads time through a
:class:`Clock` built from the steps of each epoch.

A schedule shapes the lr of the :class:`lrlab.lr_plan.LRPlan` over time: ``lr_at(step)`` is the
plan's reference lr at that step, and every parameter group gets it times its own
``lr_scale`` (discriminative learning rates keep their ratios at every step).

Every schedule is registered once in :data:`SCHEDULES` under its config name, with its
options (``train.<name>.*``) declared beside it as a nested ``Options`` section; the config's
allowed values, its option sections and the "unknown schedule" error all derive from there.
Adding a schedule is one decorated class in this file.

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

from typing import Annotated, ClassVar

import torch
from pydantic import AfterValidator, Field

from lrlab.errors import LrlabError
from lrlab.plateau import find_plateaus
from lrlab.registry import Registry, Section, choice

SCHEDULES: Registry[type[Schedule]] = Registry("schedule", "train.schedule")
"""Config name -> :class:`Schedule` subclass."""

CYCLIC_MODES = {
    "triangular": lambda cycle, position, gamma: 1.0,
    "triangular2": lambda cycle, position, gamma: 1.0 / 2.0 ** cycle,
    "exp_range": lambda cycle, position, gamma: gamma ** position,
}
"""train.cyclic.mode -> amplitude scale (cycle index, epochs elapsed, gamma) of :class:`Cyclic`."""
CyclicMode = choice(tuple(CYCLIC_MODES), "train.cyclic.mode")


def _increasing_epochs(milestones: list[int]) -> list[int]:
    if any(m < 1 for m in milestones) or sorted(set(milestones)) != list(milestones):
        raise ValueError(f"milestones {list(milestones)} must be increasing epochs >= 1")
    return milestones


Milestones = Annotated[list[int], AfterValidator(_increasing_epochs)]
"""A config type: increasing 0-based epoch numbers >= 1 (lr or batch-size milestones)."""


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's lr to ``lr`` times the group's ``lr_scale`` (1 when absent;
    :func:`lrlab.optim.param_groups` sets it from the LRPlan for discriminative lrs)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
    number of optimizer steps taken. Subclasses set the optimizer's lr in ``__init__``.

    Class attributes of a registered schedule: ``Options`` (its config section ``train.<name>``,
    or None), ``lr_is_peak`` (True when its lr is a peak: the plan takes ``train.max_lr`` or the
    range test's lr; False: an initial lr, ``train.lr`` or the range test's), and the classmethods
    :meth:`from_options` (build from config values) and :meth:`check_lr` (reject an lr that
    does not fit the options; called once, by the LRPlan).
    """

    Options: ClassVar[type[Section] | None] = None
    lr_is_peak: ClassVar[bool] = False

    @classmethod
    def from_options(cls, optimizer: torch.optim.Optimizer, lr: float, options, clock: Clock) -> Schedule:
        """The schedule for lr ``lr`` (per step) with its ``train.<name>`` options."""
        return cls(optimizer, lr)

    @classmethod
    def check_lr(cls, options, lr: float, source: str) -> None:
        """Raise LrlabError when ``lr`` (coming from ``source``) does not fit ``options``."""

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

    def step_epoch(self, loss: float) -> None:
        """Called after each epoch's evaluation with the loss that makes decisions."""

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply()


@SCHEDULES.register("constant")
class Constant(Schedule):
    """A fixed learning rate ``lr`` (per step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float):
        super().__init__(optimizer)
        self.base_lr = lr
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr


@SCHEDULES.register("step")
class StepDecay(Schedule):
    """Step decay, per epoch: lr x gamma^floor(epoch / step_size), epoch 0-based (torch StepLR)."""

    class Options(Section):
        """train.step: lr x gamma every ``step_size`` epochs."""

        step_size: int = Field(3, gt=0)
        gamma: float = Field(0.1, gt=0, le=1)

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        return cls(optimizer, lr, options.step_size, options.gamma, clock)

    def __init__(self, optimizer, lr: float, step_size: int, gamma: float, clock: Clock):
        super().__init__(optimizer)
        self.base_lr, self.step_size, self.gamma, self.clock = lr, step_size, gamma, clock
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** (self.clock.epoch(step) // self.step_size)


@SCHEDULES.register("multistep")
class MultiStep(Schedule):
    """Multi-step decay, per epoch: lr x gamma^(milestones <= epoch), epoch 0-based
    (torch MultiStepLR): milestones [5, 8] decay from the 6th and the 9th epoch on."""

    class Options(Section):
        """train.multistep: lr x gamma at each milestone epoch (0-based, as torch)."""

        milestones: Milestones = Field(default_factory=list)  # empty: 50% and 75% of train.epochs
        gamma: float = Field(0.1, gt=0, le=1)

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        epochs = clock.epochs
        milestones = options.milestones or [round(0.5 * epochs), round(0.75 * epochs)]
        return cls(optimizer, lr, milestones, options.gamma, clock)

    def __init__(self, optimizer, lr: float, milestones: Sequence[int], gamma: float, clock: Clock):
        super().__init__(optimizer)
        self.base_lr, self.milestones, self.gamma, self.clock = lr, sorted(milestones), gamma, clock
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, self.clock.epoch(step))


@SCHEDULES.register("exponential")
class Exponential(Schedule):
    """Exponential decay, per epoch: lr x gamma^epoch, epoch 0-based (torch ExponentialLR)."""

    class Options(Section):
        """train.exponential: lr x gamma^epoch."""

        gamma: float = Field(0.9, gt=0, le=1)

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        return cls(optimizer, lr, options.gamma, clock)

    def __init__(self, optimizer, lr: float, gamma: float, clock: Clock):
        super().__init__(optimizer)
        self.base_lr, self.gamma, self.clock = lr, gamma, clock
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** self.clock.epoch(step)


@SCHEDULES.register("cosine")
class Cosine(Schedule):
    """Cosine annealing per step (Loshchilov & Hutter, SGDR, arXiv:1608.03983, one cycle,
    no restart): min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2 for step t of T total."""

    class Options(Section):
        """train.cosine: per-step cosine from lr down to min_lr (SGDR without restarts)."""

        min_lr: float = Field(0.0, ge=0)

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        return cls(optimizer, lr, clock.total_steps, options.min_lr)

    def __init__(self, optimizer, lr: float, total_steps: int, min_lr: float = 0.0):
        super().__init__(optimizer)
        self.base_lr, self.total_steps, self.min_lr = lr, total_steps, min_lr
        self._apply()

    def lr_at(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2


@SCHEDULES.register("onecycle")
class OneCycle(Schedule):
    """One-cycle policy (Smith & Topin 2017, arXiv:1708.07120), linear in both phases.

    The lr (per step) rises linearly from ``max_lr / div`` to ``max_lr`` over the first
    ``warmup_pct`` of ``total_steps`` optimizer steps (the peak is step
    round(warmup_pct x (total_steps - 1))), then falls linearly to ``max_lr / final_div`` at
    the last step. With a batch-size schedule ``total_steps`` is the sum over the epochs.
    """

    lr_is_peak = True

    class Options(Section):
        """train.onecycle: the share of steps rising to the peak lr."""

        warmup_pct: float = Field(0.25, gt=0, lt=1)

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        return cls(optimizer, lr, clock.total_steps, options.warmup_pct)

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


@SCHEDULES.register("cyclic")
class Cyclic(Schedule):
    """Cyclical learning rates (Smith 2015, arXiv:1506.01186), per step.

    With p the epochs elapsed (:meth:`Clock.position`), c = floor(p / cycle_epochs) the cycle
    and x = |2 (p / cycle_epochs - c) - 1|, the lr is
    base_lr + (max_lr - base_lr) x (1 - x) x scale: it starts at base_lr, reaches max_lr in the
    middle of each cycle and is back at base_lr after ``cycle_epochs`` epochs (the paper's
    stepsize is half a cycle). scale is 1 (triangular), 1 / 2^c (triangular2, the amplitude
    halves every cycle) or gamma^p (exp_range; the paper's exponent counts iterations, here
    epochs, so that gamma does not depend on the batch size); see :data:`CYCLIC_MODES`.
    """

    lr_is_peak = True

    class Options(Section):
        """train.cyclic (Smith 2015, arXiv:1506.01186): lr between base_lr and max_lr."""

        mode: CyclicMode = "triangular"
        base_lr: float | None = Field(None, gt=0)  # None: max_lr / 4
        cycle_epochs: float = Field(4.0, gt=0)  # one full cycle (up and down), in epochs
        gamma: float = Field(0.9, gt=0, le=1)  # exp_range: amplitude x gamma^epochs

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        base = options.base_lr if options.base_lr is not None else lr / 4
        return cls(optimizer, base, lr, options.cycle_epochs, clock, options.mode, options.gamma)

    @classmethod
    def check_lr(cls, options, lr: float, source: str) -> None:
        """Raises LrlabError: ``train.cyclic.base_lr`` not below the peak ``lr``."""
        if options.base_lr is not None and options.base_lr >= lr:
            raise LrlabError(f"train.cyclic.base_lr ({options.base_lr:g}) must be below the cyclic max_lr "
                             f"({lr:g}, {source}); lower train.cyclic.base_lr or raise train.max_lr")

    def __init__(self, optimizer, base_lr: float, max_lr: float, cycle_epochs: float, clock: Clock,
                 mode: str = "triangular", gamma: float = 1.0):
        super().__init__(optimizer)
        self.base_lr, self.max_lr, self.cycle_epochs = base_lr, max_lr, cycle_epochs
        self.clock, self.scale, self.gamma = clock, CYCLIC_MODES[mode], gamma
        self._apply()

    def lr_at(self, step: int) -> float:
        p = self.clock.position(step)
        u = p / self.cycle_epochs
        cycle = math.floor(u)
        height = (1.0 - abs(2.0 * (u - cycle) - 1.0)) * self.scale(cycle, p, self.gamma)
        return self.base_lr + (self.max_lr - self.base_lr) * height


@SCHEDULES.register("plateau")
class Plateau(Schedule):
    """ReduceLROnPlateau on the validation loss: ``torch.optim.lr_scheduler.ReduceLROnPlateau`` with
    mode "min" and threshold_mode "rel", so torch's semantics exactly (see the module
    docstring for how they differ from Keras').

    The lr is multiplied by ``factor`` once the validation loss has not improved on the best so far
    by a relative ``threshold`` for more than ``patience`` epochs, never below ``min_lr``;
    ``cooldown`` epochs after a cut are not counted. torch's scheduler drives a one-parameter
    shadow optimizer, so a warm-up in front can own the real optimizer's lr meanwhile.
    """

    class Options(Section):
        """train.plateau: ReduceLROnPlateau on the loss that makes decisions, with torch's semantics."""

        factor: float = Field(0.1, gt=0, lt=1)
        patience: int = Field(3, ge=0)  # epochs without improvement before the cut
        threshold: float = Field(1e-4, ge=0)
        min_lr: float = Field(0.0, ge=0)
        cooldown: int = Field(0, ge=0)  # epochs after a cut whose lack of improvement is not counted

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        o = options
        return cls(optimizer, lr, o.factor, o.patience, o.threshold, o.min_lr, o.cooldown)

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

    def step_epoch(self, loss: float) -> None:
        self.inner.step(loss)
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "plateau": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["plateau"])
        self._shadow.param_groups[0]["lr"] = state["lr"]
        super().load_state_dict(state)


@SCHEDULES.register("plateau_detect")
class PlateauDetect(Schedule):
    """lrlab's plateau policy: after each epoch, :func:`lrlab.plateau.find_plateaus` runs on
    the validation losses so far; when the last epoch closes a plateau (``window`` epochs whose best
    loss improves on the best before them by less than ``rel_threshold``, relative) the lr is
    multiplied by ``factor`` (not below ``min_lr``). After a cut the policy waits ``window``
    epochs before it may cut again. ``cuts`` lists the 0-based epochs of the cuts.
    The same ``train.plateau_detect`` window and threshold shade the plateaus of every run's
    ``plateaus.png``.
    """

    class Options(Section):
        """train.plateau_detect: a plateau is ``window`` epochs whose best loss improves on the
        best before them by less than ``rel_threshold`` (relative); see lrlab.plateau."""

        window: int = Field(3, ge=1)
        rel_threshold: float = Field(0.01, ge=0)
        factor: float = Field(0.1, gt=0, lt=1)  # lr x factor at each plateau found
        min_lr: float = Field(0.0, ge=0)

    @classmethod
    def from_options(cls, optimizer, lr, options, clock):
        o = options
        return cls(optimizer, lr, o.window, o.rel_threshold, o.factor, o.min_lr)

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

    def step_epoch(self, loss: float) -> None:
        self.losses.append(float(loss))
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

    def step_epoch(self, loss: float) -> None:
        self.inner.step_epoch(loss)
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


def schedule_options(train_cfg):
    """The ``train.<schedule>`` options section of the configured schedule, or None if it has none."""
    return getattr(train_cfg, train_cfg.schedule) if SCHEDULES.get(train_cfg.schedule).Options else None


def build_schedule(train_cfg, optimizer: torch.optim.Optimizer, lr: float, clock: Clock) -> Schedule:
    """The schedule named by ``train_cfg.schedule`` (from :data:`SCHEDULES`, with its
    ``train.<name>`` options), with a linear warm-up in front when ``train_cfg.warmup_epochs`` > 0.

    Args:
        train_cfg: a ``lrlab.config.TrainConfig``.
        optimizer: its param groups' lr is set at once and after every step/epoch.
        lr: the plan's reference lr (``LRPlan.lr``): the peak for onecycle/cyclic, else the
            initial lr, per step.
        clock: the optimizer steps of every epoch.
    """
    schedule = SCHEDULES.get(train_cfg.schedule).from_options(optimizer, lr, schedule_options(train_cfg), clock)
    if train_cfg.warmup_epochs > 0:
        schedule = Warmup(schedule, max(1, clock.steps_until(train_cfg.warmup_epochs)))
    return schedule
