"""The LR range test itself: a context manager that restores everything, and a one-call wrapper."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lrlab.compute import autocast
from lrlab.errors import LrlabError
from lrlab.lr_finder.batches import cycle, default_batch_fn
from lrlab.lr_finder.result import RangeTestResult
from lrlab.lr_finder.suggest import METHODS, MIN_POINTS, centered_smooth, suggest_all
from lrlab.lr_finder.sweep import MODES, group_schedules, set_group_lrs
from lrlab.lr_finder.state import TrainingState

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
Progress = Callable[[int, float, float], None]


class LRRangeTest:
    """The LR range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks",
    arXiv:1506.01186, section 3.3) as a context manager that always restores the training state.

    On entering, the model's parameters and buffers (BatchNorm statistics included), its
    ``.grad`` tensors, every module's train/eval mode, the optimizer's state (momentum buffers,
    Adam moments, step counts, learning rates) and the ``state_dict`` of ``scheduler`` (an LR
    scheduler attached to the optimizer, or anything with ``state_dict``/``load_state_dict``)
    are copied; after every :meth:`run` and on leaving the block they are put back bit-exactly,
    also when the loop raises. Memory: one extra copy of the model and the optimizer state. The
    random-number generators are not restored.

    Example::

        with LRRangeTest(model, optimizer) as finder:
            result = finder.run(loader, nn.functional.cross_entropy, start_lr=1e-5, end_lr=10)
        fig = result.plot()
        lr = result.get("valley").lr

    Args:
        model: the network, already on ``device``.
        optimizer: any torch optimizer whose parameter groups all have an "lr" key; only "lr"
            is changed during the sweep (momentum, Adam betas, weight decay are untouched).
        scheduler: an LR scheduler whose state is to be restored too (it is never stepped).
        device: where batches go; default the device of the model's first parameter.
        autocast_dtype: torch.bfloat16 / torch.float16 for ``torch.autocast`` mixed precision,
            None for float32; float16 uses a ``torch.amp.GradScaler``.
        channels_last: convert 4-d input tensors to the channels-last memory format.
        batch_fn: ``batch_fn(batch) -> (inputs, targets)``; default
            :func:`lrlab.lr_finder.default_batch_fn` ((x, y) tuples/lists, dicts with common keys).

    Raises:
        LrlabError: the optimizer has a parameter group without an "lr".
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                 device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, batch_fn: Callable[[Any], tuple[Any, Any]] | None = None):
        if not optimizer.param_groups or any("lr" not in g for g in optimizer.param_groups):
            raise LrlabError(f"optimizer {type(optimizer).__name__} has a parameter group without an 'lr' key; "
                             f"the range test needs an optimizer with a learning rate")
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device = torch.device(device)
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        self.batch_fn = batch_fn or default_batch_fn
        self._state: TrainingState | None = None

    def __enter__(self) -> LRRangeTest:
        self._state = TrainingState(self.model, self.optimizer, self.scheduler)
        return self

    def __exit__(self, *exc) -> bool:
        try:
            if self._state is not None:
                self._state.restore()
        finally:
            self._state = None
        return False

    def run(self, loader: Iterable, loss_fn: LossFn, *, start_lr: float | Sequence[float] = 1e-7,
            end_lr: float | Sequence[float] = 10.0, num_iter: int = 100, mode: str = "exp",
            smooth: float = 0.98, diverge_factor: float = 5.0, skip_start: int = 10, skip_end: int = 5,
            accumulation_steps: int = 1, val_batches: Sequence[Any] | None = None, val_every: int = 1,
            method: str = "auto", progress: Progress | None = None) -> RangeTestResult:
        """Sweep the learning rate over ``num_iter`` optimizer steps, record the loss, suggest lrs.

        Step i (0-based) sets every parameter group's lr to its i-th value (see
        :func:`lrlab.lr_finder.group_schedules`; the recorded lr is group 0's), then runs
        ``accumulation_steps`` micro-batches: forward under ``torch.autocast``,
        ``loss = loss_fn(out.float(), targets)``, backward of ``loss / accumulation_steps``; then
        one ``optimizer.step()``. The loader restarts when exhausted. With equal micro-batch
        sizes and a mean-reduced loss the gradient equals that of one batch k times larger
        (except through BatchNorm, which normalises each micro-batch on its own).

        Training loss (``val_batches`` None): one point per optimizer step, the mean of its
        micro-batch losses, measured before the step. Validation loss (Smith 2015's original
        choice, made affordable): after every ``val_every``-th step the model is evaluated in
        eval mode under ``torch.no_grad`` on the fixed ``val_batches``, and only those points
        are recorded (the mean of the per-batch losses). Cost: ``len(val_batches)`` forward
        passes every ``val_every`` steps; a forward pass costs about 1/3 of a training step, so
        the sweep takes about ``1 + len(val_batches) / (3 * val_every * accumulation_steps)``
        times as long (e.g. 4 batches every 5 steps: +27%).

        Smoothing: ``avg = b * avg + (1 - b) * loss_n``, ``smoothed_n = avg / (1 - b ** (n + 1))``
        for the n-th recorded point (bias-corrected EMA), with b = ``smooth`` for the training
        loss and ``smooth ** val_every`` for the validation loss (the same time constant in
        steps). With the validation loss ``skip_start`` / ``skip_end`` count steps and are
        rounded up to whole points.

        Stopping: a non-finite loss ends the sweep and is not recorded (stop_reason
        "non-finite loss"); from point ``skip_start`` on, ``smoothed > diverge_factor * best
        smoothed`` ends it with that point recorded ("diverged"; assumes a non-negative loss).
        The suggestions (every method of :data:`lrlab.lr_finder.METHODS`) are computed from the
        finite recorded points only, on the zero-lag curve ``centered``
        (:func:`lrlab.lr_finder.suggest.centered_smooth`), not on the lagging EMA.

        Args:
            loader: re-iterable of batches that ``batch_fn`` understands; inputs (N, C, H, W)
                float for images, targets (N,) int64 for cross-entropy.
            loss_fn: maps (outputs float32, targets) to a scalar tensor.
            start_lr, end_lr: lrs per optimizer step at the ends of the sweep; a number, or one
                value per parameter group.
            num_iter: planned number of optimizer steps.
            mode: "exp" (even steps in log lr, the usual choice) or "linear".
            smooth: EMA factor in [0, 1); 0 means no smoothing.
            diverge_factor: stop when the smoothed loss exceeds this multiple of its minimum (> 1).
            skip_start, skip_end: steps left out of the suggestions at each end (>= 0).
            accumulation_steps: micro-batches per optimizer step (>= 1).
            val_batches: a small fixed list of held-out batches, or None for the training loss.
            val_every: optimizer steps between validation points (>= 1).
            method: the suggestion method the result names as "the" suggestion, or "auto"
                (:func:`default_method`: ``max_lr`` for SGD, ``steepest`` for the others).
            progress: called as ``progress(step, lr, training loss)`` after each step's
                forward passes (the loss may be nan on the last call); the library prints nothing.

        Returns:
            a :class:`RangeTestResult`; a method that cannot suggest (too few points, no
            descent) is missing from ``suggestions`` and explained in ``suggestion_errors``.

        Raises:
            LrlabError: invalid arguments, use outside the ``with`` block, an empty or
                non-restartable loader, or a batch ``batch_fn`` does not understand. Errors
                raised by the model, loss or loader propagate unchanged. The state is restored
                in every case.
        """
        if self._state is None:
            raise LrlabError("LRRangeTest.run must be called inside its with-block: "
                             "with LRRangeTest(model, optimizer) as finder: finder.run(...)")
        val = val_batches is not None
        skip_pts = _validate(num_iter, mode, smooth, diverge_factor, skip_start, skip_end, accumulation_steps,
                             val_batches, val_every, method)
        method = default_method(self.optimizer) if method == "auto" else method
        schedules = group_schedules(start_lr, end_lr, len(self.optimizer.param_groups), num_iter, mode)
        beta = smooth ** val_every if val else smooth
        lrs: list[float] = []
        losses: list[float] = []
        smoothed: list[float] = []
        stop_reason, stop_index = "completed", None
        model, optimizer, k = self.model, self.optimizer, accumulation_steps
        scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        try:
            model.train()
            batches = cycle(loader)
            avg, best = 0.0, math.inf
            for i, group_lrs in enumerate(schedules):
                lr = group_lrs[0]
                set_group_lrs(optimizer, group_lrs)
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for _ in range(k):
                    x, y = self._to_device(next(batches))
                    with autocast(self.device, self.autocast_dtype):
                        out = model(x)
                    loss = loss_fn(out.float(), y)
                    value = float(loss.detach().item())
                    total += value
                    if not math.isfinite(value):
                        break
                    loss = loss / k
                    (loss if scaler is None else scaler.scale(loss)).backward()
                value = total / k
                if progress is not None:
                    progress(i, lr, value)
                if val and math.isfinite(value):
                    self._step(scaler)
                    if (i + 1) % val_every:
                        continue
                    value = self._val_loss(val_batches, loss_fn)
                if not math.isfinite(value):
                    stop_reason, stop_index = "non-finite loss", i
                    break
                n = len(lrs)
                avg = beta * avg + (1 - beta) * value
                s = avg / (1 - beta ** (n + 1))
                lrs.append(lr)
                losses.append(value)
                smoothed.append(s)
                best = min(best, s)
                if n >= skip_pts[0] and best > 0 and s > diverge_factor * best:
                    stop_reason, stop_index = "diverged", i
                    break  # no need to step: the state is restored anyway
                if not val:
                    self._step(scaler)
        finally:
            self._state.restore()

        found, errors = suggest_all(lrs, centered_smooth(losses), *skip_pts)
        first = schedules[0][0], schedules[-1][0]
        return RangeTestResult(
            lrs=lrs, losses=losses, smoothed=smoothed, mode=mode, start_lr=float(first[0]),
            end_lr=float(first[1]), num_iter=int(num_iter), stop_reason=stop_reason, stop_index=stop_index,
            stop_lr=float(schedules[stop_index][0] if stop_index is not None else first[1]),
            suggestions=found, suggestion_errors=errors, method=method, loss="val" if val else "train",
            val_every=int(val_every) if val else 1, skip_start=skip_pts[0], skip_end=skip_pts[1],
            accumulation_steps=int(accumulation_steps))

    # ------------------------------------------------------------------ helpers

    def _to_device(self, batch: Any) -> tuple[Any, Any]:
        x, y = self.batch_fn(batch)
        if isinstance(x, torch.Tensor):
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(y, torch.Tensor):
            y = y.to(self.device, non_blocking=True)
        return x, y

    def _step(self, scaler) -> None:
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
            scaler.update()

    def _val_loss(self, val_batches: Sequence[Any], loss_fn: LossFn) -> float:
        """Mean of ``loss_fn`` over the validation batches, in eval mode, without gradients."""
        self.model.eval()
        try:
            total = 0.0
            with torch.no_grad():
                for batch in val_batches:
                    x, y = self._to_device(batch)
                    with autocast(self.device, self.autocast_dtype):
                        out = self.model(x)
                    total += float(loss_fn(out.float(), y).item())
            return total / len(val_batches)
        finally:
            self.model.train()


def default_method(optimizer: torch.optim.Optimizer) -> str:
    """The suggestion method that ``method="auto"`` uses for ``optimizer``.

    ``max_lr`` (Smith 2018's one-cycle peak) for ``torch.optim.SGD`` (plain, momentum,
    Nesterov), ``steepest`` for every other optimizer (Adam, AdamW, RMSprop, Adagrad, ...).
    The choice is measured, not assumed: in ``benchmarks/lr_suggestion_quality.py`` (README,
    "Which suggestion to trust") ``max_lr`` was the best rule for SGD and among the worst for
    Adam, whose best lr sits in the middle of the descent, where ``steepest`` lands.
    """
    return "max_lr" if isinstance(optimizer, torch.optim.SGD) else "steepest"


def _validate(num_iter, mode, smooth, diverge_factor, skip_start, skip_end, accumulation_steps,
              val_batches, val_every, method) -> tuple[int, int]:
    """Check the sweep's arguments; return (skip_start, skip_end) in recorded points."""
    if mode not in MODES:
        raise LrlabError(f"mode {mode!r} is not a range-test mode; use one of {list(MODES)}")
    if method != "auto" and method not in METHODS:
        raise LrlabError(f"method {method!r} is not a suggestion method; use auto or one of {list(METHODS)}")
    if not 0 <= smooth < 1:
        raise LrlabError(f"smooth ({smooth}) must be an EMA factor in [0, 1)")
    if not diverge_factor > 1:
        raise LrlabError(f"diverge_factor ({diverge_factor}) must be greater than 1")
    if skip_start < 0 or skip_end < 0:
        raise LrlabError(f"skip_start ({skip_start}) and skip_end ({skip_end}) must be 0 or more")
    if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
        raise LrlabError(f"accumulation_steps ({accumulation_steps!r}) must be an integer of at least 1")
    if not (isinstance(val_every, int) and val_every >= 1):
        raise LrlabError(f"val_every ({val_every!r}) must be an integer of at least 1")
    if val_batches is not None and (isinstance(val_batches, (str, bytes)) or not hasattr(val_batches, "__len__")
                                    or len(val_batches) == 0):
        raise LrlabError("val_batches must be a non-empty list of held-out batches (or None for the training loss)")
    every = val_every if val_batches is not None else 1
    skips = (-(-skip_start // every), -(-skip_end // every))
    need = (skips[0] + skips[1] + MIN_POINTS) * every
    if not isinstance(num_iter, int) or num_iter < need:
        unit = "" if every == 1 else f" validation points every {every} steps"
        raise LrlabError(f"num_iter ({num_iter}) is too small for the smoothing and skips: skip_start ({skip_start}), "
                         f"skip_end ({skip_end}) and {MIN_POINTS}{unit} for the suggestions need at least {need}")
    return skips


def range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, loader: Iterable, *,
               scheduler: Any = None, device: torch.device | str | None = None,
               autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
               batch_fn: Callable[[Any], tuple[Any, Any]] | None = None, **run_kwargs) -> RangeTestResult:
    """One call: ``with LRRangeTest(model, optimizer, scheduler, ...) as f: return f.run(loader, loss_fn, ...)``.

    ``run_kwargs`` are :meth:`LRRangeTest.run`'s (start_lr, end_lr, num_iter, mode, smooth,
    diverge_factor, skip_start, skip_end, accumulation_steps, val_batches, val_every, method,
    progress); the other arguments are :class:`LRRangeTest`'s. Everything is restored on return.

    Raises:
        LrlabError: as :class:`LRRangeTest` and :meth:`LRRangeTest.run`.
    """
    with LRRangeTest(model, optimizer, scheduler, device=device, autocast_dtype=autocast_dtype,
                     channels_last=channels_last, batch_fn=batch_fn) as finder:
        return finder.run(loader, loss_fn, **run_kwargs)
