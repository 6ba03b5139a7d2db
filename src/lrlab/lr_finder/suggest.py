"""Learning-rate suggestions from a range-test curve, each with a band of good learning rates.

Every method is a plain function ``method(lrs, smoothed, skip_start, skip_end) -> Suggestion``
of the recorded curve, registered in ``METHODS``: lrs (N,) per optimizer step, positive and
increasing; smoothed (N,) a smoothed loss curve. The range test passes the zero-lag curve of
:func:`centered_smooth` (``RangeTestResult.centered``), not the running EMA it records as
``RangeTestResult.smoothed`` (set by ``smooth``, used only for the divergence stop): a
bias-corrected EMA with beta 0.98 trails the raw loss by about min(n/2, 49) points, which in a
60-step sweep over five decades is more than a decade of lr, so every rule applied to it lands
too high (measured in benchmarks/lr_suggestion_quality.py: with Adam all five EMA-based
suggestions were 3-100x the best lr of the grid). The first ``skip_start`` and last
``skip_end`` points are left out, then non-finite points; the rest is "the analysed window".
Slopes are d(smoothed loss)/d(log10 lr) with the real log10(lr) spacing (``np.gradient`` with
coordinates), so linear sweeps are measured on the same axis the plot shows.

=========  ===============================================================================
steepest   Most negative slope (Smith 2015, arXiv:1506.01186, section 3.3: "the learning
           rate where the loss decreases fastest"; fastai's ``steep``). Band: the contiguous
           span around it where the slope is at least ``BAND_FRACTION`` (1/2) of the steepest.
valley     Middle (in log10 lr) of the longest run of consecutive points where the smoothed
           loss strictly falls (the idea of fastai's ``valley``, Z. Mueller 2021, which uses
           the longest decreasing subsequence). Band: the central half of that run.
min10      The lr at the minimum of the smoothed loss, divided by 10 (fastai's ``minimum``
           rule of thumb, S. Gugger 2017). Band: [lr_min / 30, lr_min / 3].
descent    lrlab's rule: the lr where the smoothed loss has come ``DESCENT_FRACTION`` (3/4)
           of the way down from its highest point before the minimum to the minimum
           (interpolated in log10 lr). A level crossing of the loss itself, not the arg-min of
           a derivative, so noise moves it little, and it sits on the descent, below the
           minimum where training turns unstable. Band: the 1/2 and 9/10 crossings.
max_lr     One-cycle peak (Smith 2018, arXiv:1803.09820, section 4.1: the largest lr at which
           the loss still falls clearly): the largest lr below the minimum whose slope is still
           at least ``MAX_LR_FRACTION`` (1/4) of the steepest. Band: [steepest lr, lr_min].
=========  ===============================================================================

Each method raises ``LrlabError`` (one sentence) when fewer than ``MIN_POINTS`` finite points
remain, or when the smoothed loss does not fall within the analysed window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from lrlab.errors import LrlabError

MIN_POINTS = 5
"""Fewest finite points left after skipping that any suggestion method accepts."""
BAND_FRACTION = 0.5
DESCENT_FRACTION = 0.75
MAX_LR_FRACTION = 0.25


@dataclass(frozen=True)
class Suggestion:
    """One suggested learning rate (per optimizer step) and a band of good ones.

    Attributes:
        method: name of the method that made it (a key of ``METHODS``).
        lr: the suggested learning rate.
        index: index into the range test's ``lrs`` of the recorded point nearest to ``lr``
            in log10 (``lrs[index] == lr`` for methods that pick a recorded point).
        low, high: the band of good learning rates, ``low <= lr <= high``.
    """

    method: str
    lr: float
    index: int
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Suggestion:
        return cls(method=str(data["method"]), lr=float(data["lr"]), index=int(data["index"]),
                   low=float(data["low"]), high=float(data["high"]))


SuggestFn = Callable[..., Suggestion]
METHODS: dict[str, SuggestFn] = {}
"""The one source of suggestion-method names, in the order results list them, and the registry
:func:`suggest` dispatches through: name -> function(lrs, smoothed, skip_start, skip_end) ->
Suggestion. Filled by the ``@_method(name)`` decorator, so a new method is one decorated
function (and its row in the table above)."""


def _method(name: str) -> Callable[[SuggestFn], SuggestFn]:
    """Decorator: register the decorated function in ``METHODS`` under ``name``."""
    def register(fn: SuggestFn) -> SuggestFn:
        METHODS[name] = fn
        return fn
    return register


class _Curve:
    """The analysed window of a range-test curve: positions ``idx`` into the full arrays,
    x = log10(lr) and y = smoothed loss there (all finite, x strictly increasing)."""

    def __init__(self, method: str, lrs: Iterable[float], smoothed: Iterable[float], skip_start: int,
                 skip_end: int):
        lr = np.asarray(list(lrs), dtype=np.float64)
        loss = np.asarray(list(smoothed), dtype=np.float64)
        if lr.shape != loss.shape or lr.ndim != 1:
            raise LrlabError(f"{method}: lrs ({lr.size} values) and smoothed ({loss.size} values) "
                             f"must be 1-d and of the same length")
        if skip_start < 0 or skip_end < 0:
            raise LrlabError(f"{method}: skip_start ({skip_start}) and skip_end ({skip_end}) must be 0 or more")
        idx = np.arange(lr.size)[skip_start: max(lr.size - skip_end, 0)]
        idx = idx[np.isfinite(lr[idx]) & np.isfinite(loss[idx]) & (lr[idx] > 0)]
        if idx.size < MIN_POINTS:
            raise LrlabError(
                f"{method}: only {idx.size} finite point(s) remain of {lr.size} after skipping the first "
                f"{skip_start} and last {skip_end}; it needs at least {MIN_POINTS}")
        self.method, self.all_lrs, self.idx = method, lr, idx
        self.x, self.y = np.log10(lr[idx]), loss[idx]
        if np.any(np.diff(self.x) <= 0):
            raise LrlabError(f"{method}: lrs must be strictly increasing")

    def slope(self) -> np.ndarray:
        """d y / d x at each analysed point (second-order differences, uneven spacing allowed)."""
        return np.gradient(self.y, self.x)

    def lowest(self) -> int:
        """Position of the minimum; raises when the loss does not fall before it."""
        j = int(np.argmin(self.y))
        if j == 0 or not self.y[:j].max() > self.y[j]:
            raise LrlabError(
                f"{self.method}: the smoothed loss does not fall between lr {10 ** self.x[0]:.3g} and "
                f"{10 ** self.x[-1]:.3g}; lower start_lr or raise end_lr so the sweep covers the descent")
        return j

    def index_of(self, lr: float) -> int:
        """Index (into the full lrs) of the finite recorded lr nearest to ``lr`` in log10."""
        ok = np.flatnonzero(np.isfinite(self.all_lrs) & (self.all_lrs > 0))
        return int(ok[np.argmin(np.abs(np.log10(self.all_lrs[ok]) - math.log10(lr)))])

    def at(self, pos: int) -> float:
        return float(10 ** self.x[pos])

    def make(self, lr: float, low: float, high: float, pos: int | None = None) -> Suggestion:
        index = int(self.idx[pos]) if pos is not None else self.index_of(lr)
        lr = float(self.all_lrs[index]) if pos is not None else float(lr)
        return Suggestion(self.method, lr, index, float(min(low, lr)), float(max(high, lr)))


@_method("steepest")
def steepest(lrs, smoothed, skip_start: int = 10, skip_end: int = 5) -> Suggestion:
    """Steepest descent of the smoothed loss against log10(lr); see the module docstring."""
    c = _Curve("steepest", lrs, smoothed, skip_start, skip_end)
    s = c.slope()
    k = int(np.argmin(s))
    if not s[k] < 0:
        c.lowest()  # raises the "does not fall" error
        raise LrlabError("steepest: the smoothed loss never falls between two analysed points")
    a = b = k
    while a > 0 and s[a - 1] <= BAND_FRACTION * s[k]:
        a -= 1
    while b < len(s) - 1 and s[b + 1] <= BAND_FRACTION * s[k]:
        b += 1
    return c.make(c.at(k), c.at(a), c.at(b), pos=k)


@_method("valley")
def valley(lrs, smoothed, skip_start: int = 10, skip_end: int = 5) -> Suggestion:
    """Middle of the longest sustained descent; see the module docstring."""
    c = _Curve("valley", lrs, smoothed, skip_start, skip_end)
    falls = c.y[1:] < c.y[:-1]
    best, a = None, None
    for j, f in enumerate(np.append(falls, False)):
        if f and a is None:
            a = j
        elif not f and a is not None:
            span = c.x[j] - c.x[a]  # run of falls from point a to point j
            if best is None or span > best[2]:
                best = (a, j, span)
            a = None
    if best is None:
        c.lowest()
        raise LrlabError("valley: the smoothed loss never falls between two analysed points")
    a, b, span = best
    mid = c.x[a] + span / 2
    pos = a + int(np.argmin(np.abs(c.x[a:b + 1] - mid)))
    return c.make(c.at(pos), 10 ** (c.x[a] + span / 4), 10 ** (c.x[a] + 3 * span / 4), pos=pos)


@_method("min10")
def min10(lrs, smoothed, skip_start: int = 10, skip_end: int = 5) -> Suggestion:
    """The lr at the minimum of the smoothed loss / 10; see the module docstring."""
    c = _Curve("min10", lrs, smoothed, skip_start, skip_end)
    lr_min = c.at(c.lowest())
    return c.make(lr_min / 10, lr_min / 30, lr_min / 3)


def _crossing(c: _Curve, top: int, bottom: int, fraction: float) -> float:
    """log10 lr where y first falls to ``fraction`` of the way from y[top] down to y[bottom]."""
    level = c.y[top] - fraction * (c.y[top] - c.y[bottom])
    p = top + 1 + int(np.argmax(c.y[top + 1: bottom + 1] <= level))
    y0, y1 = c.y[p - 1], c.y[p]
    t = 1.0 if y1 == y0 else float(np.clip((y0 - level) / (y0 - y1), 0.0, 1.0))
    return float(c.x[p - 1] + t * (c.x[p] - c.x[p - 1]))


@_method("descent")
def descent(lrs, smoothed, skip_start: int = 10, skip_end: int = 5) -> Suggestion:
    """``DESCENT_FRACTION`` of the way down the descent; see the module docstring."""
    c = _Curve("descent", lrs, smoothed, skip_start, skip_end)
    bottom = c.lowest()
    top = int(np.argmax(c.y[:bottom]))
    x = {f: _crossing(c, top, bottom, f) for f in (0.5, DESCENT_FRACTION, 0.9)}
    return c.make(10 ** x[DESCENT_FRACTION], 10 ** x[0.5], 10 ** x[0.9])


@_method("max_lr")
def max_lr(lrs, smoothed, skip_start: int = 10, skip_end: int = 5) -> Suggestion:
    """One-cycle peak lr (Smith 2018); see the module docstring."""
    c = _Curve("max_lr", lrs, smoothed, skip_start, skip_end)
    bottom = c.lowest()
    s = c.slope()[: bottom + 1]
    k = int(np.argmin(s))
    if not s[k] < 0:
        raise LrlabError("max_lr: the smoothed loss never falls before its minimum")
    pos = k + int(np.flatnonzero(s[k:] <= MAX_LR_FRACTION * s[k]).max())
    return c.make(c.at(pos), c.at(k), c.at(bottom), pos=pos)


def centered_smooth(losses, sigma: float | None = None) -> np.ndarray:
    """Zero-lag smoothing of a range-test curve: a Gaussian kernel over neighbouring points.

    ``out[i] = sum_j w_ij * losses[j] / sum_j w_ij`` with ``w_ij = exp(-(i - j)^2 / (2 sigma^2))``
    over the recorded points (renormalised at the ends, so no padding is invented). Unlike the
    running EMA it looks both ways, so a descent or a rise stays where it happened. Only
    possible after the sweep; the online divergence stop keeps using the EMA.

    Args:
        losses: (N,) raw losses, finite.
        sigma: kernel width in points; default ``max(2, N / 20)`` (3 points for a 60-step test).

    Returns:
        float64 array (N,).
    """
    y = np.asarray(list(losses), dtype=np.float64)
    if y.size == 0:
        return y
    sigma = max(2.0, y.size / 20) if sigma is None else float(sigma)
    d = np.arange(y.size)
    w = np.exp(-0.5 * ((d[:, None] - d[None, :]) / sigma) ** 2)
    return (w @ y) / w.sum(1)


def suggest(method: str, lrs, smoothed, skip_start: int = 10, skip_end: int = 5) -> Suggestion:
    """The suggestion of the method named ``method`` (a key of ``METHODS``).

    Raises:
        LrlabError: an unknown method name, too few finite points, or no descent.
    """
    if method not in METHODS:
        raise LrlabError(f"unknown suggestion method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method](lrs, smoothed, skip_start, skip_end)


def suggest_all(lrs, smoothed, skip_start: int = 10, skip_end: int = 5
                ) -> tuple[dict[str, Suggestion], dict[str, str]]:
    """Every method's suggestion, and for each method that gave none, the reason (its error)."""
    out, errors = {}, {}
    for name in METHODS:
        try:
            out[name] = suggest(name, lrs, smoothed, skip_start, skip_end)
        except LrlabError as e:
            errors[name] = str(e)
    return out, errors
