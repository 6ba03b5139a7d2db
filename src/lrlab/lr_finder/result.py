"""The outcome of a range test: the curve, where and why it stopped, the suggestions; JSON and plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lrlab.errors import LrlabError
from lrlab.io import atomic_write_text
from lrlab.lr_finder.plot import range_test_figure
from lrlab.lr_finder.spread import Spread, suggestion_spread
from lrlab.lr_finder.suggest import METHODS, Suggestion, centered_smooth

STOP_REASONS = ("completed", "diverged", "non-finite loss")


@dataclass
class RangeTestResult:
    """The outcome of one LR range test.

    ``lrs``, ``losses`` and ``smoothed`` are aligned, one entry per recorded point, and hold only
    finite losses: a non-finite loss ends the sweep without being recorded. With the training
    loss (``loss == "train"``) there is one point per optimizer step, so ``len(lrs) <= num_iter``;
    with the validation loss one point every ``val_every`` steps. Learning rates are per optimizer
    step (per batch), not per epoch; with several parameter groups they are group 0's.

    Attributes:
        lrs: learning rate of each recorded point.
        losses: raw loss of each point (mean over the batch as ``loss_fn`` returns it; with
            gradient accumulation the mean over the micro-batches; with the validation loss the
            mean over the validation batches).
        smoothed: bias-corrected exponential moving average of ``losses`` with the factor
            ``smooth`` (causal; it only drives the divergence stop during the sweep; the
            suggestions and the plot read the zero-lag :attr:`centered` curve instead).
        mode: "exp" or "linear", the shape of the sweep.
        start_lr, end_lr: the ends of group 0's planned sweep.
        num_iter: the number of planned optimizer steps.
        stop_reason: "completed", "diverged" (the EMA ``smoothed`` above ``diverge_factor``
            times its best; that last point is kept) or "non-finite loss" (the NaN/inf point
            is not kept).
        stop_index: the optimizer step (0-based) that ended the sweep early, None when completed.
        stop_lr: group 0's lr at that step (``end_lr`` when completed): the top of the window
            the sweep really explored.
        suggestions: method name -> :class:`Suggestion`, for every method that gave one.
        suggestion_errors: method name -> why it gave none (one sentence).
        method: the method whose lr is "the" suggestion (``suggestion``, the plot's band).
        loss: "train" or "val", what ``losses`` measures.
        val_every: optimizer steps between validation points (1 for the training loss).
        skip_start, skip_end: recorded points left out by the suggestions at each end.
        accumulation_steps: micro-batches per optimizer step.
        cut_index, cut_lr: where :func:`lrlab.lr_finder.window.spike_cut` ended the analysed
            window (the first point of a sustained rise after the descent; the suggestions only
            read the points before it), None when it did not.
        repeats: with ``repeats=k > 1``, the k single sweeps (each a result without repeats);
            then ``lrs``/``losses``/``smoothed`` are the mean over the points all k recorded,
            the suggestions are read from it, and :attr:`spread` says how far the k single
            suggestions scatter. Empty for a single sweep.
        muon: with ``train.optimizer: muon``, Muon's own sweep (``lrlab.pipeline.range_test``):
            Muon's lr swept with the auxiliary optimizer held at this result's suggestion; its
            ``lrs`` are Muon's and its ``suggestion`` is Muon's lr. None otherwise.

    JSON: :meth:`to_dict` writes any non-finite float as ``null`` and adds the convenience keys
    ``centered``, ``suggestion``, ``max_lr`` and ``spread``; :meth:`load_json` reads a ``null`` in
    the lists back as nan; files without ``cut_index`` or ``repeats`` (older runs) load with none.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    mode: str
    start_lr: float
    end_lr: float
    num_iter: int
    stop_reason: str
    stop_index: int | None = None
    stop_lr: float | None = None
    suggestions: dict[str, Suggestion] = field(default_factory=dict)
    suggestion_errors: dict[str, str] = field(default_factory=dict)
    method: str = "steepest"
    loss: str = "train"
    val_every: int = 1
    skip_start: int = 10
    skip_end: int = 5
    accumulation_steps: int = 1
    cut_index: int | None = None
    cut_lr: float | None = None
    repeats: list[RangeTestResult] = field(default_factory=list)
    muon: RangeTestResult | None = None

    # ------------------------------------------------------------------ the chosen suggestion

    def get(self, method: str | None = None) -> Suggestion:
        """The suggestion of ``method`` (default: ``self.method``).

        Raises:
            LrlabError: an unknown method, or the method gave no suggestion on this curve
                (the message says why).
        """
        method = method or self.method
        if method not in METHODS:
            raise LrlabError(f"unknown suggestion method {method!r}; valid methods: {', '.join(METHODS)}")
        if method not in self.suggestions:
            why = self.suggestion_errors.get(method, f"{method}: no suggestion was recorded")
            raise LrlabError(f"no {method!r} suggestion from this range test ({why})")
        return self.suggestions[method]

    @property
    def suggestion(self) -> float | None:
        """The lr of the chosen method (``self.method``), None when it gave none."""
        s = self.suggestions.get(self.method)
        return None if s is None else s.lr

    @property
    def suggestion_index(self) -> int | None:
        """Index into ``lrs`` of the chosen method's suggestion, None when it gave none."""
        s = self.suggestions.get(self.method)
        return None if s is None else s.index

    @property
    def centered(self) -> list[float]:
        """Zero-lag Gaussian smoothing of ``losses``
        (:func:`lrlab.lr_finder.suggest.centered_smooth`): the curve the suggestions and the
        plot use."""
        return centered_smooth(self.losses).tolist()

    @property
    def max_lr(self) -> float | None:
        """The one-cycle peak lr (method ``max_lr``, Smith 2018), None when it gave none."""
        s = self.suggestions.get("max_lr")
        return None if s is None else s.lr

    @property
    def spread(self) -> dict[str, Spread]:
        """Per method, the :class:`lrlab.lr_finder.spread.Spread` of the repeats' single-sweep
        suggestions (geometric range, geometric std, verdict); empty without repeats."""
        return suggestion_spread([r.suggestions for r in self.repeats])

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: plain floats and ints, non-finite floats replaced by None."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("lrs", "losses", "smoothed"):
                v = [_json_float(x) for x in v]
            elif f.name in ("start_lr", "end_lr", "stop_lr", "cut_lr"):
                v = _json_float(v)
            elif f.name == "suggestions":
                v = {k: s.to_dict() for k, s in v.items()}
            elif f.name == "suggestion_errors":
                v = dict(v)
            elif f.name == "repeats":
                v = [r.to_dict() for r in v]
            elif f.name == "muon":
                v = None if v is None else v.to_dict()
            out[f.name] = v
        out["centered"] = [_json_float(x) for x in self.centered]
        out["suggestion"] = _json_float(self.suggestion)
        out["max_lr"] = _json_float(self.max_lr)
        out["spread"] = {k: s.to_dict() for k, s in self.spread.items()}
        return out

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "range-test data") -> RangeTestResult:
        """Inverse of :meth:`to_dict`.

        Raises:
            LrlabError: a required field is missing or malformed (files written before the
                suggestion methods existed are not read).
        """
        names = [f.name for f in fields(cls)]
        required = ["lrs", "losses", "smoothed", "mode", "start_lr", "end_lr", "num_iter", "stop_reason",
                    "suggestions"]
        missing = [n for n in required if not isinstance(data, dict) or n not in data]
        if missing:
            raise LrlabError(f"{source} lacks the field(s) {missing}; expected {names}")
        kwargs = {n: data[n] for n in names if n in data}
        try:
            for key in ("lrs", "losses", "smoothed"):
                kwargs[key] = [math.nan if v is None else float(v) for v in kwargs[key]]
            kwargs["suggestions"] = {k: Suggestion.from_dict(v) for k, v in kwargs["suggestions"].items()}
            kwargs["repeats"] = [cls.from_dict(r, f"{source} (repeat {i})")
                                 for i, r in enumerate(kwargs.get("repeats") or [])]
            if kwargs.get("muon") is not None:
                kwargs["muon"] = cls.from_dict(kwargs["muon"], f"{source} (Muon's sweep)")
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise LrlabError(f"{source} has a malformed curve or suggestion ({exc})") from None
        return cls(**kwargs)

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
        return cls.from_dict(data, f"range-test file {path}")

    def rows(self) -> list[dict]:
        """The suggestion table: one row per method of :data:`METHODS` with method, lr, low,
        high (None when the method gave none), used (True for ``self.method``), note (why a
        method gave none) and, with repeats, spread (geometric range max/min of the repeats'
        suggestions), gsd (geometric std) and verdict ("stable"/"unstable"; None without
        repeats). The CLI prints it, the report shows it, run summaries keep it."""
        rows, spread = [], self.spread
        for name in METHODS:
            s, sp = self.suggestions.get(name), spread.get(name)
            rows.append({"method": name, "lr": s.lr if s else None, "low": s.low if s else None,
                         "high": s.high if s else None, "used": name == self.method,
                         "note": "" if s else self.suggestion_errors.get(name, ""),
                         "spread": sp.geo_range if sp else None, "gsd": sp.geo_std if sp else None,
                         "verdict": sp.verdict if sp else None})
        return rows

    # ------------------------------------------------------------------ plot

    def plot(self, ax=None, methods: Sequence[str] | None = None):
        """Loss against learning rate (log x-axis): the raw losses (faint) and the zero-lag
        :attr:`centered` curve the suggestions read (solid; not the EMA ``smoothed``), a marker
        at every suggestion (the chosen ``method``'s larger, with a dashed line), the band of
        good lrs shaded for ``methods``, with repeats each single sweep's zero-lag curve (thin)
        and tick marks at every repeat's suggestion, the spike cut as a dotted line, and the y label "validation loss" or "training loss"
        after ``loss``. Drawn by :func:`lrlab.lr_finder.plot.range_test_figure` (matplotlib is
        imported then, not before). With Muon's sweep (:attr:`muon`) and no ``ax``, the figure
        has a second panel: Muon's curve and its suggestions.

        Args:
            ax: a matplotlib Axes to draw into (this sweep only); None makes a new figure.
            methods: whose bands to shade; default ``[self.method]``.

        Returns:
            the matplotlib Figure (not saved, not closed).
        """
        if ax is None and self.muon is not None:
            import matplotlib.pyplot as plt

            fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
            self.plot(left, methods)
            self.muon.plot(right)
            left.set_title(f"LR range test: every group (the plan's lr, {self.method})")
            right.set_title(f"Muon's sweep, the rest held at the first sweep's lr ({self.muon.method})")
            right.set_xlabel("Muon's learning rate (per step)")
            fig.tight_layout()
            return fig
        bands = list(methods) if methods is not None else [self.method]
        scatter = {k: [v for v in sp.lrs if v is not None] for k, sp in self.spread.items()}
        return range_test_figure(self.lrs, self.losses, self.centered,
                                 {k: (s.lr, s.low, s.high) for k, s in self.suggestions.items()},
                                 chosen=self.method, bands=bands, ax=ax,
                                 ylabel="validation loss" if self.loss == "val" else "training loss",
                                 repeats=[(r.lrs, r.centered) for r in self.repeats], scatter=scatter,
                                 cut_lr=self.cut_lr)


def _json_float(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)
