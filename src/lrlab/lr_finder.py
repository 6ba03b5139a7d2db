"""The learning-rate range test (Smith 2015) and its steepest-descent suggestion.

The range test trains for ``num_iter`` optimizer steps while the learning rate rises from
``start_lr`` to ``end_lr`` (exponentially or linearly), records the training loss of every
step, and suggests the learning rate where the smoothed loss falls fastest.

Sources:
    L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", 2015,
    arXiv:1506.01186, section 3.3 ("LR range test").
    Loss smoothing (bias-corrected exponential moving average) and the exponential sweep as
    popularised by fastai, see S. Gugger, "How Do You Find A Good Learning Rate", 2017.

Differences from common implementations, on purpose:
    * the model, optimizer, gradients and train/eval modes are restored bit-exactly in a
      ``finally`` block, also when the loop raises (no manual ``reset()``);
    * a non-finite loss stops the sweep and is never part of the suggestion;
    * the suggestion is a plain function of the recorded curve (not hidden in a plot) and uses
      the real log10(lr) spacing, so it is also right for linear sweeps;
    * the divergence check starts only after ``skip_start`` steps, where the EMA is meaningful.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from lrlab.device import autocast
from lrlab.errors import LrlabError
from lrlab.io import atomic_write_text

MODES = ("exp", "linear")
STOP_REASONS = ("completed", "diverged", "non-finite loss")
MIN_POINTS = 5
"""Fewest finite points left after skipping that :func:`steepest_descent` accepts."""


@dataclass
class RangeTestResult:
    """The outcome of one LR range test.

    ``lrs``, ``losses`` and ``smoothed`` are aligned, one entry per recorded optimizer step, and
    hold only steps with a finite loss: a non-finite loss ends the sweep without being recorded,
    so ``len(lrs) <= num_iter``. Learning rates are per optimizer step (per batch), not per epoch.

    Attributes:
        lrs: learning rate used at each recorded step.
        losses: raw training loss of each step (mean over the batch, as ``loss_fn`` returns it).
        smoothed: bias-corrected exponential moving average of ``losses``.
        mode: "exp" or "linear", the shape of the sweep.
        start_lr, end_lr: the ends of the planned sweep.
        num_iter: the number of planned steps.
        stop_reason: "completed", "diverged" (smoothed loss above ``diverge_factor`` times its
            best; that last point is kept) or "non-finite loss" (the NaN/inf step is not kept).
        suggestion: learning rate of steepest descent of the smoothed loss, or None when too
            few points were recorded.
        suggestion_index: index of ``suggestion`` in ``lrs``, or None.
        method: name of the suggestion method.

    JSON: :meth:`to_dict` writes any non-finite float as ``null``; :meth:`load_json` reads a
    ``null`` inside the lists back as ``nan``.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    mode: str
    start_lr: float
    end_lr: float
    num_iter: int
    stop_reason: str
    suggestion: float | None
    suggestion_index: int | None
    method: str = "steepest"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: plain floats and ints, non-finite floats replaced by None."""
        out = asdict(self)
        for key in ("lrs", "losses", "smoothed"):
            out[key] = [_json_float(v) for v in out[key]]
        for key in ("start_lr", "end_lr", "suggestion"):
            out[key] = _json_float(out[key])
        return out

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> RangeTestResult:
        """Read a file written by :meth:`save_json`.

        Raises:
            LrlabError: when the file is missing, not JSON, or lacks a field.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LrlabError(f"range-test file {path} could not be read as JSON ({exc})") from None
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n != "method" and n not in data]
        if not isinstance(data, dict) or missing:
            raise LrlabError(f"range-test file {path} lacks the field(s) {missing}; expected {names}")
        kwargs = {n: data[n] for n in names if n in data}
        for key in ("lrs", "losses", "smoothed"):
            kwargs[key] = [math.nan if v is None else float(v) for v in kwargs[key]]
        return cls(**kwargs)


def _json_float(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def lr_schedule(start_lr: float, end_lr: float, num_iter: int, mode: str = "exp") -> list[float]:
    """The ``num_iter`` learning rates of the sweep, first ``start_lr``, last ``end_lr``.

    exp:    lr_i = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
    linear: lr_i = start_lr + (end_lr - start_lr) * i / (num_iter - 1),   i = 0 .. num_iter-1.

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
    lrs[-1] = float(end_lr)  # exact end despite rounding
    return lrs


def steepest_descent(lrs: Iterable[float], smoothed: Iterable[float],
                     skip_start: int = 10, skip_end: int = 5) -> int:
    """Index of the most negative slope d(smoothed loss) / d(log10 lr).

    The slope comes from ``np.gradient`` with the actual log10(lr) coordinates (second-order
    central differences, valid for uneven spacing), so exponential and linear sweeps are both
    measured on the log axis that the plot shows. The first ``skip_start`` and last
    ``skip_end`` points are ignored, then non-finite points (loss or lr) are dropped.

    Args:
        lrs: learning rates, shape (N,), positive and strictly increasing.
        smoothed: smoothed losses, shape (N,).

    Returns:
        An index into the given sequences (not into the trimmed ones).

    Raises:
        LrlabError: when fewer than ``MIN_POINTS`` (5) finite points remain, or the lengths differ.
    """
    lr = np.asarray(list(lrs), dtype=np.float64)
    loss = np.asarray(list(smoothed), dtype=np.float64)
    if lr.shape != loss.shape:
        raise LrlabError(f"lrs ({lr.size} values) and smoothed ({loss.size} values) must have the same length")
    idx = np.arange(lr.size)[skip_start: max(lr.size - skip_end, 0)]
    idx = idx[np.isfinite(lr[idx]) & np.isfinite(loss[idx]) & (lr[idx] > 0)]
    if idx.size < MIN_POINTS:
        raise LrlabError(
            f"only {idx.size} finite point(s) remain of {lr.size} after skipping the first "
            f"{skip_start} and last {skip_end}; steepest descent needs at least {MIN_POINTS}")
    x = np.log10(lr[idx])
    if np.any(np.diff(x) <= 0):
        raise LrlabError("lrs must be strictly increasing for the steepest-descent suggestion")
    return int(idx[int(np.argmin(np.gradient(loss[idx], x)))])


def _validate(optimizer, start_lr, end_lr, num_iter, mode, smooth, diverge_factor,
              skip_start, skip_end) -> None:
    if not start_lr > 0:
        raise LrlabError(f"start_lr ({start_lr}) must be a positive learning rate")
    if not end_lr > start_lr:
        raise LrlabError(f"start_lr ({start_lr}) must be below end_lr ({end_lr})")
    if mode not in MODES:
        raise LrlabError(f"mode {mode!r} is not a range-test mode; use one of {list(MODES)}")
    if skip_start < 0 or skip_end < 0:
        raise LrlabError(f"skip_start ({skip_start}) and skip_end ({skip_end}) must be 0 or more")
    need = skip_start + skip_end + MIN_POINTS
    if num_iter < need:
        raise LrlabError(f"num_iter ({num_iter}) must be at least {need} "
                         f"(skip_start {skip_start} + skip_end {skip_end} + {MIN_POINTS})")
    if not 0 <= smooth < 1:
        raise LrlabError(f"smooth ({smooth}) must be an EMA factor in [0, 1)")
    if not diverge_factor > 1:
        raise LrlabError(f"diverge_factor ({diverge_factor}) must be greater than 1")
    if not optimizer.param_groups or any("lr" not in g for g in optimizer.param_groups):
        raise LrlabError(f"optimizer {type(optimizer).__name__} has a parameter group without an "
                         f"'lr' key; the range test needs optimizers with a learning rate")


def _batches(loader):
    """Yield batches forever, restarting ``loader`` whenever it is exhausted."""
    served = 0
    while True:
        fresh = True
        for batch in loader:
            fresh = False
            served += 1
            yield batch
        if fresh:
            if served == 0:
                raise LrlabError("loader yielded no batches; the range test needs at least one (x, y) batch")
            raise LrlabError(f"loader ran out after {served} batches and could not be restarted; "
                             f"pass a re-iterable loader such as a DataLoader, or lower num_iter")


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loader: Iterable, *,
               start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100,
               mode: str = "exp", smooth: float = 0.98, diverge_factor: float = 5.0,
               skip_start: int = 10, skip_end: int = 5, device: torch.device | str | None = None,
               autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
               progress: Callable[[int, float, float], None] | None = None) -> RangeTestResult:
    """Run the LR range test (Smith 2015, arXiv:1506.01186) and restore everything afterwards.

    Step i (0-based) sets lr_i from :func:`lr_schedule` on every parameter group, takes the
    next batch (the loader restarts when exhausted), runs forward under ``torch.autocast``,
    ``loss = loss_fn(out.float(), y)``, then backward and ``optimizer.step()``. The smoothed loss
    is ``avg = smooth * avg + (1 - smooth) * loss; smoothed_i = avg / (1 - smooth ** (i + 1))``.

    The sweep stops early on a non-finite loss (not recorded, stop_reason "non-finite loss") or,
    from step ``skip_start`` on, when ``smoothed > diverge_factor * best smoothed`` (recorded,
    stop_reason "diverged"; assumes a non-negative loss such as cross-entropy).

    Model parameters and buffers (BatchNorm statistics included), optimizer state (momentum
    buffers, step counts, learning rates), ``.grad`` tensors and each module's train/eval mode
    are snapshotted first and restored bit-exactly in a ``finally`` block, on error too. The
    snapshot is a full copy on the model's device (memory: one extra model + optimizer state).
    The RNG state is not restored.

    Args:
        model: the network, already on ``device``; put into train mode for the sweep.
        optimizer: any optimizer whose parameter groups have an "lr" key.
        loss_fn: maps logits (N, num_classes) float32 and targets (N,) int64 to a scalar.
        loader: re-iterable of (x, y) tuples or lists, x (N, C, H, W) float, y (N,) int64.
        start_lr, end_lr: learning rates per optimizer step at the ends of the sweep.
        num_iter: planned number of optimizer steps (batches).
        mode: "exp" (even steps in log lr, the usual choice) or "linear".
        smooth: EMA factor beta in [0, 1); 0 means no smoothing.
        diverge_factor: stop when the smoothed loss exceeds this multiple of its minimum.
        skip_start, skip_end: points ignored at each end by the suggestion.
        device: where batches go; default the device of the model's first parameter.
        autocast_dtype: torch.bfloat16 / torch.float16 for mixed precision, None for fp32;
            float16 uses a ``torch.amp.GradScaler``.
        channels_last: convert 4-d inputs to channels-last memory format.
        progress: called as ``progress(step, lr, loss)`` after each step (loss may be nan on
            the final step); the library itself prints nothing.

    Returns:
        A :class:`RangeTestResult`; ``suggestion`` is None when too few points were recorded.

    Raises:
        LrlabError: for invalid arguments, an empty or non-restartable loader, or a batch that
            is not an (x, y) pair. Errors raised by the model, loss or loader propagate unchanged.
    """
    _validate(optimizer, start_lr, end_lr, num_iter, mode, smooth, diverge_factor, skip_start, skip_end)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    schedule = lr_schedule(start_lr, end_lr, num_iter, mode)

    # Snapshot first, before anything is touched.
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim_state = copy.deepcopy(optimizer.state_dict())
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stop_reason = "completed"
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    try:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        batches = _batches(loader)
        avg, best = 0.0, math.inf
        for i, lr in enumerate(schedule):
            _set_lr(optimizer, lr)
            batch = next(batches)
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise LrlabError(f"loader yielded a {type(batch).__name__}; each batch must be an (x, y) tuple or list")
            x = batch[0].to(device, non_blocking=True)
            y = batch[1].to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, autocast_dtype):
                out = model(x)
            loss = loss_fn(out.float(), y)
            value = float(loss.detach().item())
            if progress is not None:
                progress(i, lr, value)
            if not math.isfinite(value):
                stop_reason = "non-finite loss"
                break
            avg = smooth * avg + (1 - smooth) * value
            s = avg / (1 - smooth ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(s)
            best = min(best, s)
            if i >= skip_start and best > 0 and s > diverge_factor * best:
                stop_reason = "diverged"
                break  # no need to step: the model is restored anyway
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        for p, g in grads.items():
            p.grad = g
        for m, training in modes.items():
            m.training = training

    try:
        index: int | None = steepest_descent(lrs, smoothed, skip_start, skip_end)
    except LrlabError:
        index = None
    return RangeTestResult(
        lrs=lrs, losses=losses, smoothed=smoothed, mode=mode, start_lr=float(start_lr),
        end_lr=float(end_lr), num_iter=int(num_iter), stop_reason=stop_reason,
        suggestion=None if index is None else lrs[index], suggestion_index=index)
