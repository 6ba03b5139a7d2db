"""The LR range test itself: a context manager that restores everything, and a one-call wrapper."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lrlab.errors import LrlabError
from lrlab.lr_finder.batches import cycle, default_batch_fn
from lrlab.lr_finder.repeats import mean_of_repeats
from lrlab.lr_finder.result import RangeTestResult
from lrlab.lr_finder.suggest import METHODS, MIN_POINTS
from lrlab.lr_finder.window import analyse
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
            method: str = "steepest", repeats: int = 1, record_group: int = 0, cut_spikes: bool = True,
            progress: Progress | None = None) -> RangeTestResult:
        """Sweep the learning rate over ``num_iter`` optimizer steps, record the loss, suggest lrs.

        Step i (0-based) sets every parameter group's lr to its i-th value (see
        :func:`lrlab.lr_finder.group_schedules`; the recorded lr is group ``record_group``'s), then runs
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

        EMA (recorded as ``smoothed``, used only by the divergence stop): ``avg = b * avg + (1 -
        b) * loss_n``, ``smoothed_n = avg / (1 - b ** (n + 1))`` for the n-th recorded point
        (bias-corrected), with b = ``smooth`` for the training loss and ``smooth ** val_every``
        for the validation loss (the same time constant in steps). With the validation loss
        ``skip_start`` / ``skip_end`` count steps and are rounded up to whole points.

        Stopping: a non-finite loss ends the sweep and is not recorded (stop_reason
        "non-finite loss"); from point ``skip_start`` on, ``smoothed > diverge_factor * best
        smoothed`` ends it with that point recorded ("diverged"; assumes a non-negative loss).

        Suggestions: every method of :data:`lrlab.lr_finder.METHODS`, computed after the sweep
        from the finite recorded points only, on the zero-lag curve ``centered``
        (:func:`lrlab.lr_finder.suggest.centered_smooth` of the raw losses), not on the lagging
        EMA; ``smooth`` does not change them. The analysed window ends at the first sustained
        rise after the descent (:func:`lrlab.lr_finder.window.spike_cut`, recorded as
        ``cut_index``/``cut_lr``), so a spike that falls again cannot move them.

        Repeats (confidence): with ``repeats=k > 1`` the sweep runs k times, each from the same
        restored state (bit for bit) and from a fresh ``iter(loader)``: a loader that reshuffles
        on every iteration (``DataLoader(shuffle=True)``, lrlab's ``BatchLoader``) gives every
        repeat a new data order and new augmentation draws; a list gives the same batches. The
        lr used comes from the mean curve (:func:`lrlab.lr_finder.repeats.mean_of_repeats`); the
        result keeps the k single sweeps in ``repeats`` and their spread in ``spread``. Cost: k
        times one sweep.

        Args:
            loader: re-iterable of batches that ``batch_fn`` understands; inputs (N, C, H, W)
                float for images, targets (N,) int64 for cross-entropy.
            loss_fn: maps (outputs float32, targets) to a scalar tensor.
            start_lr, end_lr: lrs per optimizer step at the ends of the sweep; a number, or one
                value per parameter group.
            num_iter: planned number of optimizer steps.
            mode: "exp" (even steps in log lr, the usual choice) or "linear".
            smooth: factor of the EMA that drives the divergence stop, in [0, 1); 0 means the
                raw loss. It does not affect the suggestions.
            diverge_factor: stop when the EMA exceeds this multiple of its minimum (> 1).
            skip_start, skip_end: steps left out of the suggestions at each end (>= 0).
            accumulation_steps: micro-batches per optimizer step (>= 1).
            val_batches: a small fixed list of held-out batches, or None for the training loss.
            val_every: optimizer steps between validation points (>= 1).
            method: the suggestion method (a key of ``METHODS``) the result names as "the"
                suggestion (``result.suggestion``, the plot's shaded band); every method's
                suggestion is computed either way.
            repeats: number of sweeps k (>= 1); 1 is the plain range test.
            record_group: the parameter group whose lr is recorded (``lrs``, ``start_lr``,
                ``end_lr``, ``stop_lr``); it must sweep (start below end). 0: the plan's
                reference group.
            cut_spikes: False: the suggestions read the whole window, no spike cut.
            progress: called as ``progress(step, lr, training loss)`` after each step's
                forward passes (the loss may be nan on the last call; with repeats the step
                counts on: r * num_iter + i); the library prints nothing.

        Returns:
            a :class:`RangeTestResult`; a method that cannot suggest (too few points, no
            descent) is missing from ``suggestions`` and explained in ``suggestion_errors``.

        Raises:
            LrlabError: invalid arguments, use outside the ``with`` block, an empty or
                non-restartable loader, repeats below 1, or a batch ``batch_fn`` does not understand. Errors
                raised by the model, loss or loader propagate unchanged. The state is restored
                in every case.
        """
        if self._state is None:
            raise LrlabError("LRRangeTest.run must be called inside its with-block: "
                             "with LRRangeTest(model, optimizer) as finder: finder.run(...)")
        if not (isinstance(repeats, int) and not isinstance(repeats, bool) and repeats >= 1):
            raise LrlabError(f"repeats ({repeats!r}) must be an integer of at least 1")
        val = val_batches is not None
        skip_pts = _validate(num_iter, mode, smooth, diverge_factor, skip_start, skip_end, accumulation_steps,
                             val_batches, val_every, method)
        schedules = group_schedules(start_lr, end_lr, len(self.optimizer.param_groups), num_iter, mode)
        g = record_group
        if not (isinstance(g, int) and 0 <= g < len(schedules[0]) and schedules[0][g] < schedules[-1][g]):
            raise LrlabError(f"record_group ({g!r}) must be the index of a parameter group whose lr sweeps "
                             f"(start below end), of {len(schedules[0])} group(s)")
        singles = []
        for r in range(repeats):
            record = _Recorder(smooth ** val_every if val else smooth, diverge_factor, skip_pts[0])
            shift = None if progress is None else (lambda i, lr, v, r=r: progress(r * num_iter + i, lr, v))
            self._sweep(loader, loss_fn, schedules, g, record, accumulation_steps, val_batches, val_every, shift)
            found, errors, cut = analyse(record.lrs, record.losses, *skip_pts, cut_spikes)
            first = schedules[0][g], schedules[-1][g]
            singles.append(RangeTestResult(
                lrs=record.lrs, losses=record.losses, smoothed=record.smoothed, mode=mode, start_lr=float(first[0]),
                end_lr=float(first[1]), num_iter=int(num_iter), stop_reason=record.stop_reason,
                stop_index=record.stop_index,
                stop_lr=float(schedules[record.stop_index][g] if record.stop_index is not None else first[1]),
                suggestions=found, suggestion_errors=errors, method=method, loss="val" if val else "train",
                val_every=int(val_every) if val else 1, skip_start=skip_pts[0], skip_end=skip_pts[1],
                accumulation_steps=int(accumulation_steps), cut_index=cut,
                cut_lr=None if cut is None else float(record.lrs[cut])))
        return singles[0] if repeats == 1 else mean_of_repeats(singles, cut_spikes)

    def _sweep(self, loader: Iterable, loss_fn: LossFn, schedules: list[list[float]], g: int, record: _Recorder,
               accumulation_steps: int, val_batches: Sequence[Any] | None, val_every: int,
               progress: Progress | None) -> None:
        """One sweep over ``schedules`` into ``record`` (group ``g``'s lr) from a fresh
        ``iter(loader)``; the training state is restored afterwards (also on error)."""
        scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        try:
            self.model.train()
            batches = cycle(loader)
            for i, group_lrs in enumerate(schedules):
                set_group_lrs(self.optimizer, group_lrs)
                value = self._train_loss(batches, loss_fn, accumulation_steps, scaler)
                if progress is not None:
                    progress(i, group_lrs[g], value)
                if self._advance(i, group_lrs[g], value, record, scaler, loss_fn, val_batches, val_every):
                    break
        finally:
            self._state.restore()

    # ------------------------------------------------------------------ one optimizer step

    def _train_loss(self, batches: Iterator[Any], loss_fn: LossFn, k: int, scaler) -> float:
        """Zero the gradients, then forward and backward ``k`` micro-batches (each loss divided by
        ``k``, so the gradients add up to those of the mean). Returns the mean of the ``k``
        losses, non-finite (and with no further micro-batches run) once one of them is."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(k):
            x, y = self._to_device(next(batches))
            with self._autocast():
                out = self.model(x)
            loss = loss_fn(out.float(), y)
            value = float(loss.detach().item())
            total += value
            if not math.isfinite(value):
                break
            loss = loss / k
            (loss if scaler is None else scaler.scale(loss)).backward()
        return total / k

    def _advance(self, i: int, lr: float, value: float, record: _Recorder, scaler, loss_fn: LossFn,
                 val_batches: Sequence[Any] | None, val_every: int) -> bool:
        """Finish step ``i`` (gradients in place, ``value`` its training loss): record its point
        and take the optimizer step; True when the sweep stops here.

        Training loss: ``value`` is recorded (measured before the step), then the step is taken
        unless the point stopped the sweep. Validation loss: the step is taken first (unless
        ``value`` is non-finite), then on every ``val_every``-th step the validation loss is
        recorded. A stopped sweep needs no step: the state is restored anyway.
        """
        if val_batches is not None and math.isfinite(value):
            self._step(scaler)
            if (i + 1) % val_every:
                return False
            value = self._val_loss(val_batches, loss_fn)
        if record.add(i, lr, value):
            return True
        if val_batches is None:
            self._step(scaler)
        return False

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

    def _autocast(self):
        """``torch.autocast`` in ``autocast_dtype`` on the device's type; a no-op for float32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

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
                    with self._autocast():
                        out = self.model(x)
                    total += float(loss_fn(out.float(), y).item())
            return total / len(val_batches)
        finally:
            self.model.train()


class _Recorder:
    """The recorded points of one sweep, the EMA that drives the divergence stop, and why it stopped.

    ``lrs``, ``losses`` and ``smoothed`` become the result's lists; ``stop_reason`` is
    "completed" until :meth:`add` stops the sweep, ``stop_index`` the step that did.
    """

    def __init__(self, beta: float, diverge_factor: float, skip_start: int):
        self.beta, self.diverge_factor, self.skip_start = beta, diverge_factor, skip_start
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.avg, self.best = 0.0, math.inf
        self.stop_reason: str = "completed"
        self.stop_index: int | None = None

    def add(self, i: int, lr: float, value: float) -> bool:
        """Record the loss ``value`` of step ``i`` at ``lr``; True when the sweep stops here.

        A non-finite ``value`` is not recorded and stops it ("non-finite loss"). Otherwise
        ``avg = b * avg + (1 - b) * value`` and the bias-corrected ``avg / (1 - b ** (n + 1))``
        (n: the point's index) is appended to ``smoothed``; from point ``skip_start`` on, an EMA
        above ``diverge_factor`` times its best (when that best is positive) stops the sweep
        with the point kept ("diverged").
        """
        if not math.isfinite(value):
            self.stop_reason, self.stop_index = "non-finite loss", i
            return True
        n = len(self.lrs)
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        s = self.avg / (1 - self.beta ** (n + 1))
        self.lrs.append(lr)
        self.losses.append(value)
        self.smoothed.append(s)
        self.best = min(self.best, s)
        if n >= self.skip_start and self.best > 0 and s > self.diverge_factor * self.best:
            self.stop_reason, self.stop_index = "diverged", i
            return True
        return False


def _validate(num_iter, mode, smooth, diverge_factor, skip_start, skip_end, accumulation_steps,
              val_batches, val_every, method) -> tuple[int, int]:
    """Check the sweep's arguments; return (skip_start, skip_end) in recorded points."""
    if mode not in MODES:
        raise LrlabError(f"mode {mode!r} is not a range-test mode; use one of {list(MODES)}")
    if method not in METHODS:
        raise LrlabError(f"method {method!r} is not a suggestion method; use one of {list(METHODS)}")
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
        raise LrlabError(f"num_iter ({num_iter}) is too small for the skips: skip_start ({skip_start}), "
                         f"skip_end ({skip_end}) and {MIN_POINTS}{unit} for the suggestions need at least {need}")
    return skips


def range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, loader: Iterable, *,
               scheduler: Any = None, device: torch.device | str | None = None,
               autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
               batch_fn: Callable[[Any], tuple[Any, Any]] | None = None, method: str = "steepest",
               **run_kwargs) -> RangeTestResult:
    """One call: ``with LRRangeTest(model, optimizer, scheduler, ...) as f: return f.run(loader, loss_fn, ...)``.

    ``method`` and ``run_kwargs`` are :meth:`LRRangeTest.run`'s (start_lr, end_lr, num_iter,
    mode, smooth, diverge_factor, skip_start, skip_end, accumulation_steps, val_batches,
    val_every, repeats, record_group, cut_spikes, progress); the other arguments are :class:`LRRangeTest`'s. Everything is
    restored on return.

    Raises:
        LrlabError: as :class:`LRRangeTest` and :meth:`LRRangeTest.run`.
    """
    with LRRangeTest(model, optimizer, scheduler, device=device, autocast_dtype=autocast_dtype,
                     channels_last=channels_last, batch_fn=batch_fn) as finder:
        return finder.run(loader, loss_fn, method=method, **run_kwargs)
