"""Find the spans where a metric series stops improving (learning-rate plateaus).

A point i of the series is *flat* when the best value of the last ``window`` points
(values[i - window + 1 .. i]) improves on the best value before them by less than
``rel_threshold`` times that earlier best (in absolute value), or does not improve at all.
The plateau that point belongs to starts where that earlier best was reached (the last
improvement) and ends at i; overlapping spans are merged. A plateau is therefore found
``window`` points after its start, and spans shorter than ``window + 1`` points are not
reported. NaN values never count as an improvement.

This is lrlab's "custom method to identify the learning-rate plateau": the
``plateau_detect`` schedule cuts the lr when the last epoch closes a plateau of the validation
loss, and the run's ``plateaus.png`` shades the spans on the loss and accuracy curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lrlab.errors import LrlabError


def _best(values: Sequence[float], sign: float) -> tuple[int, float] | None:
    """(index of the first best value, that value) for minimisation of sign x value."""
    best = None
    for i, v in enumerate(values):
        if v is None or math.isnan(v):
            continue
        if best is None or sign * v < sign * best[1]:
            best = (i, float(v))
    return best


def find_plateaus(values: Sequence[float], window: int = 3, rel_threshold: float = 0.01,
                  mode: str = "min") -> list[tuple[int, int]]:
    """Spans (start, end) of ``values`` where the metric stops improving; see the module docstring.

    Args:
        values: the series, e.g. validation loss per epoch (any length; NaN allowed).
        window: number of points that must bring no relative improvement of at least
            ``rel_threshold`` (>= 1).
        rel_threshold: the relative improvement that still counts as progress (>= 0);
            0.01 = 1%.
        mode: "min" (loss: lower is better) or "max" (accuracy: higher is better).

    Returns:
        0-based inclusive index pairs (start, end), sorted and non-overlapping; start is the
        point of the last improvement before the plateau.

    Raises:
        LrlabError: window < 1, rel_threshold < 0 or an unknown mode.
    """
    if window < 1 or rel_threshold < 0 or mode not in ("min", "max"):
        raise LrlabError(f"plateau window={window}, rel_threshold={rel_threshold:g}, mode={mode!r} is not "
                         f"valid; use window >= 1, rel_threshold >= 0 and mode 'min' or 'max'")
    sign = 1.0 if mode == "min" else -1.0
    spans: list[list[int]] = []
    for i in range(window, len(values)):
        before = _best(values[:i - window + 1], sign)
        recent = _best(values[i - window + 1:i + 1], sign)
        if before is None:
            continue
        gain = -math.inf if recent is None else sign * (before[1] - recent[1])
        if gain > rel_threshold * abs(before[1]):
            continue
        start = before[0]
        if spans and start <= spans[-1][1]:
            spans[-1][1] = i
        else:
            spans.append([start, i])
    return [(s, e) for s, e in spans]
