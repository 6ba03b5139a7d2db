"""The learning-rate sequence of a range test: exponential or linear, one per parameter group."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lrlab.errors import LrlabError

MODES = ("exp", "linear")


def lr_schedule(start_lr: float, end_lr: float, num_iter: int, mode: str = "exp") -> list[float]:
    """The ``num_iter`` learning rates (per optimizer step) of a sweep, first ``start_lr``, last ``end_lr``.

    exp:    lr_i = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
    linear: lr_i = start_lr + (end_lr - start_lr) * i / (num_iter - 1),   i = 0 .. num_iter-1.

    The exponential sweep spaces the points evenly in log10(lr), as the range-test plot shows
    them (Smith 2015, arXiv:1506.01186 uses a linear sweep; the exponential one is fastai's).

    Raises:
        LrlabError: for an unknown mode or num_iter < 2.
    """
    if mode not in MODES:
        raise LrlabError(f"mode {mode!r} is not a range-test mode; use one of {list(MODES)}")
    if num_iter < 2:
        raise LrlabError(f"num_iter ({num_iter}) must be at least 2 for a learning-rate sweep")
    n = num_iter - 1
    if mode == "exp":
        ratio = end_lr / start_lr
        lrs = [start_lr * ratio ** (i / n) for i in range(num_iter)]
    else:
        lrs = [start_lr + (end_lr - start_lr) * i / n for i in range(num_iter)]
    lrs[0] = float(start_lr)
    lrs[-1] = float(end_lr)  # exact ends despite rounding
    return lrs


def per_group(value: float | Sequence[float], num_groups: int, name: str) -> list[float]:
    """``value`` as one float per parameter group: a number is repeated, a sequence must have
    exactly ``num_groups`` entries.

    Raises:
        LrlabError: a sequence of the wrong length, or an entry that is not a finite number.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * num_groups
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_groups:
            raise LrlabError(f"{name} has {len(value)} values but the optimizer has {num_groups} parameter "
                             f"group(s); give one number or one value per group")
        values = [float(v) for v in value]
    else:
        raise LrlabError(f"{name} ({value!r}) must be a number or a sequence with one number per parameter group")
    if not all(math.isfinite(v) for v in values):
        raise LrlabError(f"{name} ({value!r}) must be finite")
    return values


def group_schedules(start_lr: float | Sequence[float], end_lr: float | Sequence[float], num_groups: int,
                    num_iter: int, mode: str) -> list[list[float]]:
    """The sweep of every parameter group: ``out[i][g]`` is the lr of group g at step i.

    Each group runs its own :func:`lr_schedule` from its start to its end lr, all with the same
    ``num_iter`` and ``mode``, so the groups keep fixed ratios in an exponential sweep. A group
    whose start equals its end is held at that lr (a sweep of one optimizer of several, e.g.
    Muon's with the auxiliary optimizer held: ``lrlab.pipeline.range_test``); at least one group
    must sweep.

    Raises:
        LrlabError: a start lr that is not positive, a start lr above its end lr, no group that
            sweeps, or sequences whose length differs from ``num_groups``.
    """
    starts = per_group(start_lr, num_groups, "start_lr")
    ends = per_group(end_lr, num_groups, "end_lr")
    scalar = all(isinstance(v, (int, float)) for v in (start_lr, end_lr))
    for g, (s, e) in enumerate(zip(starts, ends)):
        where = "" if scalar else f" for parameter group {g}"
        if not s > 0:
            raise LrlabError(f"start_lr ({s}){where} must be a positive learning rate")
        if not e >= s or (scalar and e == s):
            raise LrlabError(f"start_lr ({s}) must be below end_lr ({e}){where}")
    if all(e == s for s, e in zip(starts, ends)):
        raise LrlabError(f"start_lr ({starts}) must be below end_lr ({ends}) for at least one parameter group")
    columns = [lr_schedule(s, e, num_iter, mode) if e > s else [s] * num_iter for s, e in zip(starts, ends)]
    return [list(step) for step in zip(*columns)]


def set_group_lrs(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> None:
    """Set ``param_groups[g]["lr"] = lrs[g]``; a tensor lr (capturable / fused optimizers) is
    filled in place so the optimizer keeps its tensor. Nothing else in the group is touched
    (momentum, betas, weight decay stay as they are)."""
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
