"""A bit-exact snapshot of everything a range test changes, and its restore."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class TrainingState:
    """Copies of a model's parameters and buffers, its ``.grad`` tensors and every module's
    train/eval mode, an optimizer's ``state_dict`` (momentum buffers, Adam moments, step
    counts, learning rates and every other group option) and, optionally, the ``state_dict``
    of an attached LR scheduler (anything with ``state_dict`` / ``load_state_dict``).

    :meth:`restore` puts them all back bit-exactly, in place: parameters keep their identity,
    so the optimizer still points at them. Memory: one extra copy of the model and of the
    optimizer state, on their own devices. The random-number generators are not included.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.params = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
        self.optim = copy.deepcopy(optimizer.state_dict())
        self.sched = None if scheduler is None else copy.deepcopy(scheduler.state_dict())
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        """Put the snapshot back (may be called any number of times)."""
        self.model.load_state_dict(self.params)
        self.optimizer.load_state_dict(copy.deepcopy(self.optim))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self.sched))
        for p, g in self.grads:
            p.grad = None if g is None else g.clone()
        for m, training in self.modes:
            m.training = training
