"""How much a suggestion moves between repeated sweeps: geometric range, geometric std, verdict.

A single range test reads one noisy curve (one data order, one set of augmentation draws), and
its suggestion moves between runs (pytorch-lr-finder #106, fastai #3295). With
``LRRangeTest.run(..., repeats=k)`` each method's k single-sweep suggestions measure that.

Verdict: "stable" when every repeat gave a suggestion and max/min <= ``STABLE_RANGE`` (1.5,
i.e. all within +-0.09 decades of their geometric centre); "unstable" otherwise. Why 1.5: the
methods' own bands of good lrs span a factor of 3 to 10, and lr grids are rarely finer than a
factor of 2 (lrlab's benchmarks use ~2.2), so suggestions within 1.5x of each other are the same
choice for training; a wider spread means one sweep could have picked a different grid point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from lrlab.lr_finder.suggest import METHODS, Suggestion

STABLE_RANGE = 1.5
"""Largest max/min of the repeats' suggestions still called "stable"."""
VERDICTS = ("stable", "unstable")


@dataclass(frozen=True)
class Spread:
    """One method's suggestions over k repeated sweeps.

    Attributes:
        method: the suggestion method (a key of ``METHODS``).
        lrs: each repeat's suggested lr (per optimizer step), None where it gave none.
        geo_range: max / min of the given lrs (>= 1), None with fewer than 2.
        geo_std: geometric standard deviation exp(std(ln lr)) (sample std, ddof 1; >= 1),
            None with fewer than 2.
        verdict: "stable" or "unstable" (see the module docstring).
    """

    method: str
    lrs: tuple[float | None, ...]
    geo_range: float | None
    geo_std: float | None
    verdict: str

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lrs"] = list(self.lrs)
        return out


def suggestion_spread(per_repeat: Sequence[Mapping[str, Suggestion]]) -> dict[str, Spread]:
    """Each method's :class:`Spread` over the repeats' suggestion dicts (method -> Suggestion);
    empty for fewer than 2 repeats."""
    if len(per_repeat) < 2:
        return {}
    out = {}
    for name in METHODS:
        lrs = tuple(s[name].lr if name in s else None for s in per_repeat)
        logs = [math.log(v) for v in lrs if v is not None and v > 0]
        geo_range = geo_std = None
        if len(logs) >= 2:
            mean = sum(logs) / len(logs)
            geo_range = math.exp(max(logs) - min(logs))
            geo_std = math.exp(math.sqrt(sum((v - mean) ** 2 for v in logs) / (len(logs) - 1)))
        stable = len(logs) == len(lrs) and geo_range is not None and geo_range <= STABLE_RANGE
        out[name] = Spread(name, lrs, geo_range, geo_std, VERDICTS[0] if stable else VERDICTS[1])
    return out
