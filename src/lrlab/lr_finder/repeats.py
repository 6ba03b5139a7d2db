"""One result from k repeated sweeps: the mean curve, the suggestions read from it, the sweeps kept.

The rule for the lr actually used: every method is applied to the mean of the k zero-lag curves
over the points all k sweeps recorded (the first n points, n the shortest sweep's length; the
sweeps share one lr grid, so point i has the same lr in each). Smoothing is linear, so this is
the zero-lag curve of the mean raw loss; averaging k curves divides the batch noise's variance
by k, which a single sweep's suggestion cannot do. The k single-sweep suggestions are kept to
measure how far one sweep alone could land (:mod:`lrlab.lr_finder.spread`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from lrlab.errors import LrlabError
from lrlab.lr_finder.result import RangeTestResult
from lrlab.lr_finder.window import analyse


def mean_of_repeats(singles: Sequence[RangeTestResult], cut_spikes: bool = True) -> RangeTestResult:
    """The combined result of repeated sweeps of one range test (same grid, method and skips).

    ``lrs`` are the first n lrs (n: the shortest sweep's number of points), ``losses`` and
    ``smoothed`` the point-wise means over the sweeps (float), the suggestions and the spike cut
    those of that mean curve (:func:`lrlab.lr_finder.window.analyse` with ``cut_spikes``); stop fields come from the
    shortest sweep (the first one that stopped), ``repeats`` holds ``singles``.

    Raises:
        LrlabError: fewer than 2 sweeps, or sweeps whose lr grids differ.
    """
    if len(singles) < 2:
        raise LrlabError(f"mean_of_repeats needs at least 2 sweeps, got {len(singles)}")
    n = min(len(s.lrs) for s in singles)
    lrs = list(singles[0].lrs[:n])
    if any(not np.allclose(s.lrs[:n], lrs, rtol=1e-12, atol=0) for s in singles):
        raise LrlabError("the repeated sweeps have different lr grids; repeat one range test with one setting")
    losses = np.mean([s.losses[:n] for s in singles], axis=0).tolist()
    smoothed = np.mean([s.smoothed[:n] for s in singles], axis=0).tolist()
    first = min(singles, key=lambda s: len(s.lrs))
    found, errors, cut = analyse(lrs, losses, first.skip_start, first.skip_end, cut_spikes)
    return replace(first, lrs=lrs, losses=losses, smoothed=smoothed, suggestions=found, suggestion_errors=errors,
                   cut_index=cut, cut_lr=None if cut is None else float(lrs[cut]), repeats=list(singles))
