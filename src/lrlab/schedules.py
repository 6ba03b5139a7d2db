"""Learning-rate schedules, stepped by the training loop.

Every schedule has ``step_batch()`` (called after each optimizer step) and
``step_epoch(test_loss)`` (called after each epoch's evaluation); each ignores the
call it does not use, so the loop needs no per-schedule branches. Learning rates are
per optimizer step and apply to every parameter group.
"""

from __future__ import annotations

import torch

from lrlab.errors import LrlabError


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Constant:
    """A fixed learning rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float):
        set_lr(optimizer, lr)

    def step_batch(self) -> None:
        pass

    def step_epoch(self, test_loss: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class OneCycle(Constant):
    """One-cycle policy (Smith & Topin 2017, arXiv:1708.07120), linear in both phases.

    The lr rises linearly from ``max_lr / div`` to ``max_lr`` over the first
    ``warmup_pct`` of ``total_steps`` optimizer steps, then falls linearly to
    ``max_lr / final_div`` at the last step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int,
                 warmup_pct: float = 0.25, div: float = 10.0, final_div: float = 1e3):
        if total_steps < 2:
            raise LrlabError(f"one-cycle needs at least 2 steps, got total_steps={total_steps}")
        self.optimizer, self.max_lr, self.total_steps = optimizer, max_lr, total_steps
        self.peak = max(1, round(warmup_pct * (total_steps - 1)))
        self.div, self.final_div = div, final_div
        self.step_count = 0
        set_lr(optimizer, self.lr_at(0))

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        lo, hi, end = self.max_lr / self.div, self.max_lr, self.max_lr / self.final_div
        step = min(step, self.total_steps - 1)
        if step <= self.peak:
            return lo + (hi - lo) * step / self.peak
        return hi + (end - hi) * (step - self.peak) / (self.total_steps - 1 - self.peak)

    def step_batch(self) -> None:
        self.step_count += 1
        set_lr(self.optimizer, self.lr_at(self.step_count))

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        set_lr(self.optimizer, self.lr_at(self.step_count))


class Plateau(Constant):
    """ReduceLROnPlateau on the test loss, with ``torch.optim.lr_scheduler`` semantics.

    The lr is multiplied by ``factor`` once the test loss has not improved by a relative
    ``threshold`` for more than ``patience`` epochs, never going below ``min_lr``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, factor: float = 0.1,
                 patience: int = 3, threshold: float = 1e-4, min_lr: float = 0.0):
        set_lr(optimizer, lr)
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=factor, patience=patience, threshold=threshold, min_lr=min_lr)

    def step_epoch(self, test_loss: float) -> None:
        self.inner.step(test_loss)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def build_schedule(train_cfg, optimizer: torch.optim.Optimizer, lr: float, steps_per_epoch: int):
    """The schedule named by ``train_cfg.schedule`` with peak/initial learning rate ``lr``."""
    if train_cfg.schedule == "onecycle":
        return OneCycle(optimizer, lr, train_cfg.epochs * steps_per_epoch, train_cfg.warmup_pct)
    if train_cfg.schedule == "plateau":
        p = train_cfg.plateau
        return Plateau(optimizer, lr, p.factor, p.patience, p.threshold, p.min_lr)
    return Constant(optimizer, lr)
