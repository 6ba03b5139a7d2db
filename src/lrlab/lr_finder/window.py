"""The analysed window of a range-test curve: where a sustained rise cuts it, and the suggestions inside it.

A curve that descends, spikes and falls again (FastNet at batch 512 above lr ~1; ResNet18,
whose loss explodes and then settles near chance level at huge lrs) has a second descent after
the spike, often to a lower minimum; read whole, it drags the minimum (``min10``, ``max_lr``),
the longest descent (``valley``) or the top of the descent (``descent``) to lrs where training
already broke down once. :func:`spike_cut` ends the analysed window at the first SUSTAINED rise
of the zero-lag curve after its descent, and :func:`analyse` lets every method see only the
points before it.

Rule ("sustained rise"), on the zero-lag curve y from point ``skip_start`` on: let ``low`` be
the running minimum of y and ``depth`` the descent into it (the highest y before the minimum,
minus ``low``). The descent counts once ``depth >= MIN_DROP * (that highest y)`` (the loss has
fallen by 5% of its level; before that, a flat noisy start is never cut). A rise is sustained
when y stays above ``low + RISE_FRACTION * depth`` (a quarter of the descent) for
``SUSTAIN_POINTS`` (3) consecutive points; the window is cut at the first of them. A spike
narrower than that in the zero-lag curve, or less than a quarter of the descent high, is noise
and left alone. On a clean curve (descent, minimum, divergence) the cut lands on the final rise,
after the minimum, where no method looks, so the suggestions do not move (checked on the saved
range tests of lrlab's runs; see tests/test_lr_finder_confidence.py for planted spikes).
"""

from __future__ import annotations

import numpy as np

from lrlab.lr_finder.suggest import Suggestion, centered_smooth, suggest_all

RISE_FRACTION = 0.25
"""A rise counts once the zero-lag loss is this fraction of the descent's depth above its minimum."""
MIN_DROP = 0.05
"""The descent counts once the loss fell by this fraction of its highest value before the minimum."""
SUSTAIN_POINTS = 3
"""Consecutive points above the rise level that make it sustained (not noise)."""


def spike_cut(centered, skip_start: int = 10, skip_end: int = 5) -> int | None:
    """Index of the first point of the first sustained rise after the descent (module docstring),
    None when there is none that starts inside the window ``[skip_start, N - skip_end)``.

    Args:
        centered: (N,) the zero-lag curve (:func:`lrlab.lr_finder.centered_smooth`), finite.
        skip_start, skip_end: the points the suggestions leave out at each end; the rise's
            later points may lie in the last ``skip_end``.

    Returns:
        an index into the curve (the window ends just before it), or None.
    """
    y = np.asarray(list(centered), dtype=np.float64)
    end = y.size - skip_end
    low, peak, top, run, start = np.inf, -np.inf, -np.inf, 0, 0
    for i in range(max(skip_start, 0), y.size):
        v = y[i]
        if not np.isfinite(v):
            break
        if v < low:
            low, top = v, max(peak, v)
        peak = max(peak, v)
        depth = top - low
        rising = depth > 0 and depth >= MIN_DROP * abs(top) and v > low + RISE_FRACTION * depth
        run, start = (run + 1, start if run else i) if rising else (0, i)
        if run >= SUSTAIN_POINTS:
            return start if start < end else None
        if run == 0 and i >= end:
            return None
    return None


def analyse(lrs, losses, skip_start: int = 10, skip_end: int = 5, cut_spikes: bool = True
            ) -> tuple[dict[str, Suggestion], dict[str, str], int | None]:
    """Every method's suggestion on the zero-lag curve of ``losses``, inside the window cut by
    :func:`spike_cut`: ``(suggestions, errors, cut)`` as :func:`lrlab.lr_finder.suggest_all`,
    plus the cut's index (None: no cut, the window is the usual one).

    Args:
        lrs: (N,) lrs per optimizer step, increasing; losses: (N,) raw finite losses.
        skip_start, skip_end: points left out at each end (the cut can only shorten the window).
        cut_spikes: False reads the whole window (Muon's own sweep, whose rise and second
            descent are not a breakdown: ``lrlab.pipeline.range_test``).
    """
    centered = centered_smooth(losses)
    cut = spike_cut(centered, skip_start, skip_end) if cut_spikes else None
    end = skip_end if cut is None else max(skip_end, len(centered) - cut)
    found, errors = suggest_all(lrs, centered, skip_start, end)
    return found, errors, cut
