"""The range-test figure: loss against learning rate, every suggestion marked, bands shaded.

matplotlib is imported only when a figure is made (inside :func:`range_test_figure`), so the
rest of ``lrlab.lr_finder`` works without it, and the figure uses whatever backend the caller
chose (inline in a notebook, Agg in a script). Nothing here saves or closes a figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RANGE_TEST_COLORS = {"steepest": "tab:red", "valley": "tab:green", "min10": "tab:purple",
                     "descent": "tab:orange", "max_lr": "tab:brown"}
"""Marker and band colour of each suggestion method; any other name gets a colour of the cycle."""


def range_test_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    suggestions: Mapping[str, tuple[float, float, float]] | None = None,
    *,
    chosen: str | None = None,
    bands: Sequence[str] | None = None,
    ax=None,
    log_x: bool = True,
    ylabel: str = "training loss",
    repeats: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    scatter: Mapping[str, Sequence[float]] | None = None,
    cut_lr: float | None = None,
) -> Figure:
    """The LR range test (Smith 2015, arXiv:1506.01186): loss against learning rate.

    Args:
        lrs: (S,) learning rate (per optimizer step) of each recorded point.
        losses: (S,) raw loss per point (drawn faint; NaN/inf are left out).
        smoothed: (S,) smoothed loss, drawn solid; the markers sit on it. ``RangeTestResult.plot``
            passes the zero-lag ``centered`` curve the suggestions read, not the EMA.
        suggestions: method name -> (lr, low, high); each lr gets a marker on the smoothed
            curve and a legend entry "name: 3.2e-02" ("(used)" for ``chosen``); a None or
            non-finite lr is skipped, a None low/high means no band.
        chosen: the method whose lr is used; its marker is larger, a dashed line marks it and
            its band is shaded by default.
        bands: the methods whose [low, high] band is shaded; default ``[chosen]``.
        ax: the Axes to draw into; None makes a new 7 x 4.5 inch figure.
        log_x: logarithmic learning-rate axis (when every finite lr is positive).
        ylabel: the y-axis label.
        repeats: (lrs, zero-lag loss) of each repeated sweep, drawn as thin grey curves.
        scatter: method name -> each repeat's suggested lr, drawn as short tick marks in the
            method's colour at the bottom of the axes (the spread of the suggestion).
        cut_lr: where the analysed window was cut (a sustained rise), a dotted vertical line.

    Returns:
        the matplotlib Figure (open; the caller shows, saves or closes it).

    Raises:
        ValueError: the three sequences differ in length.
    """
    lrs_a, raw, smooth = _finite(lrs), _finite(losses), _finite(smoothed)
    if not (len(lrs_a) == len(raw) == len(smooth)):
        raise ValueError(f"lrs, losses and smoothed differ in length: {len(lrs_a)}, {len(raw)}, {len(smooth)}")
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
    else:
        fig = ax.figure
    for k, (r_lrs, r_loss) in enumerate(repeats):
        ax.plot(_finite(r_lrs), _finite(r_loss), color="0.45", linewidth=0.7, alpha=0.7,
                label=f"{len(repeats)} repeats" if k == 0 else None)
    _draw_curves(ax, lrs_a, raw, smooth, log_x=log_x, ylabel=ylabel)
    _draw_spread(ax, dict(scatter or {}), cut_lr)
    shade = list(bands) if bands is not None else ([chosen] if chosen else [])
    _draw_suggestions(ax, lrs_a, smooth, dict(suggestions or {}), chosen=chosen, shade=shade)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def _draw_curves(ax, lrs: np.ndarray, raw: np.ndarray, smooth: np.ndarray, *, log_x: bool, ylabel: str) -> None:
    """The raw (faint) and smoothed (solid) loss, axes, labels, title, grid and the y range."""
    ax.plot(lrs, raw, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(lrs, smooth, color="tab:blue", linewidth=2, label="smoothed loss")
    if log_x and np.nanmin(lrs, initial=np.inf) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate (per step)")
    ax.set_ylabel(ylabel)
    ax.set_title("LR range test")
    ax.grid(True, which="major", alpha=0.3)
    # The loss usually explodes at the end; keep the interesting part readable.
    ylim = _range_test_ylim(raw, smooth)
    if ylim is not None:
        ax.set_ylim(*ylim)


def _draw_suggestions(ax, lrs: np.ndarray, smooth: np.ndarray, suggestions: dict[str, tuple[float, float, float]],
                      *, chosen: str | None, shade: Sequence[str]) -> None:
    """Each suggestion's band (when in ``shade``) and marker on the smoothed curve; the chosen
    one larger, with a dashed vertical line."""
    ok = np.isfinite(lrs) & np.isfinite(smooth)
    on_curve = ok.sum() >= 1 and _increasing(lrs[ok])
    for k, (name, (lr, low, high)) in enumerate(suggestions.items()):
        if lr is None or not math.isfinite(lr):
            continue
        color = RANGE_TEST_COLORS.get(name, f"C{(k + 3) % 10}")
        if name in shade and low is not None and high is not None:
            ax.axvspan(low, high, color=color, alpha=0.12, linewidth=0)
        used = name == chosen
        if used:
            ax.axvline(lr, color=color, linestyle="--", linewidth=1.2)
        if on_curve:
            y = float(np.interp(lr, lrs[ok], smooth[ok]))
            ax.plot([lr], [y], "o", color=color, markersize=8 if used else 5, zorder=3,
                    label=f"{name}: {lr:.1e}" + (" (used)" if used else ""),
                    markeredgecolor="black" if used else color)


def _draw_spread(ax, scatter: dict[str, Sequence[float]], cut_lr: float | None) -> None:
    """Tick marks at each repeat's suggestion (bottom 6% of the axes), and the spike cut."""
    for k, (name, lrs) in enumerate(scatter.items()):
        color = RANGE_TEST_COLORS.get(name, f"C{(k + 3) % 10}")
        for lr in lrs:
            if lr is not None and math.isfinite(lr):
                ax.axvline(lr, ymin=0.0, ymax=0.06, color=color, linewidth=1.5)
    if cut_lr is not None and math.isfinite(cut_lr):
        ax.axvline(cut_lr, color="black", linestyle=":", linewidth=1.2, label=f"window cut: {cut_lr:.1e}")


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """float64 array with non-finite entries (inf, None) replaced by NaN, which matplotlib skips."""
    a = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    a[~np.isfinite(a)] = np.nan
    return a


def _increasing(a: np.ndarray) -> bool:
    return bool(np.all(np.diff(a) > 0))


def _range_test_ylim(raw: np.ndarray, smooth: np.ndarray) -> tuple[float, float] | None:
    """(bottom, top) of the y-axis: from the lowest loss up to at most half the smoothed curve's
    pre-minimum range above its highest point before the minimum (so the explosion at the end
    does not flatten the descent), padded by 5%; None when no loss is finite."""
    both = np.concatenate([raw, smooth])
    if not np.isfinite(both).any():
        return None
    lo = float(np.nanmin(both))
    hi = float(np.nanmax(both))
    if np.isfinite(smooth).any():
        best = int(np.nanargmin(smooth))
        before = smooth[: best + 1]
        hi = min(hi, 1.5 * float(np.nanmax(before)) - 0.5 * float(np.nanmin(before)) + 1e-12)
        hi = max(hi, float(np.nanmax(before)))
    pad = 0.05 * max(hi - lo, 1e-6)
    return lo - pad, hi + pad
