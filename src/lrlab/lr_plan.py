"""The learning rate, resolved once: :class:`LRPlan`.

Which number does a run train with? The recipe's ``train.lr``, its ``train.max_lr``, the range
test's suggestion (by ``lr_finder.method``, times ``lr_finder.lr_factor``), and, with
discriminative learning rates, one value per layer group. This module is the only place that
combines them, and the only place that checks them:

* a schedule whose lr is a peak (one-cycle, cyclic: ``Schedule.lr_is_peak``) takes
  ``train.max_lr`` when set, else the range test's lr; it needs one of the two;
* any other schedule starts at the range test's lr when the test runs, else at ``train.lr``;
* the schedule may reject the lr (cyclic: ``train.cyclic.base_lr`` must be below the peak);
* with ``train.layer_groups`` (bottom to top) and ``train.lr_ratio`` r, layer group i of n gets
  lr x r^-((n - 1 - i) / (n - 1)): the top group the plan's lr, the bottom one lr / r, geometric
  in between (fastai's ``slice(lr / r, lr)``; Howard & Ruder 2018, arXiv:1801.06146);
* with ``train.optimizer: muon`` the plan's lr is the auxiliary optimizer's, and Muon's groups
  train at lr x the plan's ``muon_lr_ratio`` (in every layer group, times its scale;
  ``lrlab.optim``): Muon's sweep's suggestion / the first sweep's when the lr comes from a range
  test that swept Muon (``lr_finder.muon``), else ``train.muon.lr_ratio``;
* an LR-free optimizer (``lrlab.optim.lr_free``: schedulefree_sgd, schedulefree_adamw, prodigy,
  dadapt_sgd, dadapt_adam, dog) has no range test (:func:`range_test_applies`); it trains at the
  recipe's lr when the recipe sets one (``train.max_lr`` for a peak schedule, else ``train.lr``),
  else at its package's documented default (source "LR-free optimizer: lr = 1 (the package's
  default)"). A ``train.schedule`` its package does not document (schedule-free and DoG:
  constant; Prodigy: constant or cosine; D-Adaptation: any) is replaced by ``constant``, and the
  plan says so (:attr:`LRPlan.schedule`, :attr:`LRPlan.notes`); ``train.warmup_epochs`` stays (for
  schedule-free it is exactly the package's ``warmup_steps``: lr x (k + 1) / W);
* with ``train.lr_scale_rule`` linear or sqrt, an lr meant for another batch size is scaled to
  ``train.batch_size`` (the global batch under torchrun), once, here (:func:`batch_scale`).

Optimizers are built from the plan (``build_optimizer(cfg, model, plan.lr, plan.scales)``),
schedules shape ``plan.lr`` over time for every group, the report prints :meth:`LRPlan.rows`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lrlab.errors import LrlabError
from lrlab.lr_finder.result import RangeTestResult
from lrlab.optim import LrFree, MuonWithAux, lr_free
from lrlab.schedules import SCHEDULES, schedule_options


def suggestion_method(method: str, optimizer: torch.optim.Optimizer, fine_tuning: bool = False) -> str:
    """The range-test suggestion a run trains with: ``lr_finder.method``, or for ``auto``, by the
    optimizer whose lr the plan and the range test set (for Muon, :class:`lrlab.optim.MuonWithAux`,
    its auxiliary one): with an SGD lr (plain, momentum, Nesterov) ``max_lr`` (Smith 2018's
    one-cycle peak), or ``descent`` when ``fine_tuning`` (pretrained weights, more than the top
    layer group training: :func:`lrlab.transfer.fine_tunes`); ``steepest`` with every other
    optimizer. Measured, not assumed: in benchmarks/lr_suggestion_quality.py (README, "Which
    suggestion to trust") max_lr was the best rule for SGD and among the worst for Adam, whose best
    lr sits mid-descent; with Muon + Nesterov SGD max_lr reached 0.996 of the grid best and
    steepest 0.986; fine-tuning EfficientNet-Lite0 with SGD, max_lr overshot the grid best
    (0.939 of it) where descent reached 0.994."""
    if method != "auto":
        return method
    plan_part = optimizer.aux if isinstance(optimizer, MuonWithAux) else optimizer
    if not isinstance(plan_part, torch.optim.SGD):
        return "steepest"
    return "descent" if fine_tuning else "max_lr"


def muon_method(method: str, curve: RangeTestResult) -> str:
    """The suggestion of Muon's own sweep (``lr_finder.muon.method``) that becomes Muon's lr, read
    from that sweep's ``curve``. ``auto``: ``max_lr`` (the one-cycle peak, as for SGD) where Muon's
    curve turns inside its analysed window, ``min10`` (one tenth of the lowest point) where it is
    still falling at the window's last analysed lr. Measured, not assumed, in
    benchmarks/lr_suggestion_quality.py and on recipes/cifar10-quick-muon.yaml (README, "Which
    suggestion to trust"): on FastNet and ResNet18 with BatchNorm after every conv, Muon's curve,
    the rest held, never turned in nine sweeps (Muon's updates have a fixed size and the
    normalised filters ignore their scale, so a large lr grows the filters and slows itself);
    min10 then reads 0.125, inside the wide band where Muon's lr is good (0.03-0.1): 0.995, 0.978
    and 1.001 of Muon's grid best on fastnet-muon, resnet18-muon and fastnet-muon-adamw, where
    max_lr would read the window's end (1.25: 0.91 on resnet18-muon). With airbench94's weight
    renormalisation (``train.muon.renorm``) the filters cannot grow, and the curve turns at
    ~0.1: there min10 read 0.012 (hold-out 78.6% against 87.4% at airbench's 0.148) and max_lr
    0.086; on the check setup fastnet-muon-renorm max_lr gave 0.979 of the grid best and min10
    0.945 (a curve that is flat near its lowest point puts max_lr where the noise does: 0.52 on
    one seed). Any other method is returned as given."""
    if method != "auto":
        return method
    lowest = curve.suggestions.get("max_lr")  # its band's top is the lowest point's lr
    last = curve.lrs[max(0, len(curve.lrs) - 1 - curve.skip_end)]
    return "max_lr" if lowest is not None and lowest.high < last else "min10"


LR_SCALE_RULES = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}
"""``train.lr_scale_rule``: the exponent p of lr x (batch / reference batch)^p."""


def batch_scale(rule: str, batch: int, reference: int) -> float:
    """The lr multiplier (batch / reference)^p of ``rule`` (:data:`LR_SCALE_RULES`): linear is
    Goyal et al. 2017 (arXiv:1706.02677, the linear scaling rule of large-batch SGD), sqrt is
    Krizhevsky 2014 (arXiv:1404.5997) and Hoffer et al. 2017 (arXiv:1705.08741), often used with
    adaptive optimizers; timm's ``--lr-base``/``--lr-base-size``/``--lr-base-scale`` offer the same.
    1 for "none" or equal batches."""
    return (batch / reference) ** LR_SCALE_RULES[rule]


def _scaled(config, lr: float, source: str, reference: int) -> tuple[float, str, float]:
    """(lr, source, factor) after ``train.lr_scale_rule`` from ``reference`` images per step to
    ``train.batch_size``; the source says so when the factor is not 1."""
    t = config.train
    factor = batch_scale(t.lr_scale_rule, t.batch_size, reference)
    if factor == 1.0:
        return lr, source, factor
    return (lr * factor, f"{source} x {factor:.4g} ({t.lr_scale_rule}: batch {t.batch_size} / {reference})",
            factor)


def range_test_applies(config) -> bool:
    """True when the run's lr can come from an LR range test: ``lr_finder.enabled`` and an
    optimizer that needs an lr (not an LR-free one, :func:`lrlab.optim.lr_free`)."""
    return config.lr_finder.enabled and lr_free(config.train.optimizer) is None


def check_range_test_applies(config) -> None:
    """For a command that runs the range test only (``lrlab find-lr``).

    Raises:
        LrlabError: the optimizer is LR-free, so there is nothing to find.
    """
    free = lr_free(config.train.optimizer)
    if free is not None:
        raise LrlabError(f"train.optimizer {config.train.optimizer} is LR-free ({free.source} trains at lr "
                         f"{free.default_lr:g}, the package's default), so the LR range test does not apply; "
                         f"use 'lrlab run' or 'lrlab train'")


def layer_scales(num_groups: int, ratio: float) -> tuple[float, ...]:
    """lr of each layer group (bottom first) / the top group's: geometric from 1/ratio to 1."""
    if num_groups <= 1:
        return (1.0,)
    return tuple(ratio ** -((num_groups - 1 - i) / (num_groups - 1)) for i in range(num_groups))


@dataclass(frozen=True)
class LRPlan:
    """The learning rates of a run, made once (:meth:`make`) and read by everything after.

    Attributes:
        lr: the reference lr per optimizer step: the peak (one-cycle, cyclic) or initial lr
            (the other schedules) of the top layer group.
        kind: "peak" or "initial", what ``lr`` is for the run's schedule.
        source: where ``lr`` came from, e.g. "train.max_lr", "train.lr" or
            "range test: max_lr 0.298 x lr_factor 2".
        scales: per layer group, bottom first: its lr / ``lr`` (1 for the top group).
        group_names: per layer group, the module names it holds ("all" without layer groups).
        suggestion: the range test's suggestion that was used (before ``lr_factor``), or None.
        method: the suggestion method that gave it, or None.
        muon_lr_ratio: with ``train.optimizer: muon``, Muon's lr / ``lr`` in every layer group
            (Muon's sweep's suggestion / the first sweep's, or ``train.muon.lr_ratio``); None
            for the other optimizers.
        muon_source: where Muon's lr came from, e.g. "Muon's range test: min10 0.125 x
            lr_factor 1" or "train.muon.lr_ratio 0.1"; None for the other optimizers.
        batch_scale: the factor of ``train.lr_scale_rule`` in ``lr`` (1: none), from the batch the
            lr was meant for (``train.lr_base_batch``; the range test's batch for its suggestion)
            to ``train.batch_size``.
        lr_free: True for an LR-free optimizer (no range test; see the module docstring).
        schedule: the schedule the run uses instead of ``train.schedule`` (LR-free optimizers),
            or None: ``train.schedule``.
        notes: sentences on what the plan changed or ignored (for the report and lr_plan.json).
    """

    lr: float
    kind: str
    source: str
    scales: tuple[float, ...] = (1.0,)
    group_names: tuple[str, ...] = ("all",)
    suggestion: float | None = None
    method: str | None = None
    muon_lr_ratio: float | None = None
    muon_source: str | None = None
    batch_scale: float = 1.0
    lr_free: bool = False
    schedule: str | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def make(cls, config, suggestion: float | None = None, method: str | None = None,
             muon: tuple[float, str] | None = None) -> LRPlan:
        """The plan for ``config`` and the range test's ``suggestion`` (None: no range test);
        ``muon``: Muon's sweep's (suggestion, method), used with the range test's lr.

        Raises:
            LrlabError: a peak schedule with neither ``train.max_lr`` nor a suggestion, or an lr
                the schedule rejects (cyclic base_lr not below the peak).
        """
        t = config.train
        free = lr_free(t.optimizer)
        if free is not None:
            return cls._lr_free(config, free)
        schedule = SCHEDULES.get(t.schedule)
        used = None  # the suggestion the lr comes from
        if schedule.lr_is_peak and t.max_lr is not None:
            lr, source, scale = _scaled(config, t.max_lr, "train.max_lr", t.lr_base_batch)
        elif suggestion is not None:
            used, factor = suggestion, config.lr_finder.lr_factor
            lr, source, scale = _scaled(config, suggestion * factor, f"range test: {method} {suggestion:.3g} x "
                                        f"lr_factor {factor:g}", config.lr_finder.batch_size or t.batch_size)
        elif schedule.lr_is_peak:
            raise LrlabError(f"train.schedule {t.schedule!r} needs a max_lr: set train.max_lr or let the range "
                             f"test find it (lr_finder.enabled=true, the run command)")
        else:
            lr, source, scale = _scaled(config, t.lr, "train.lr", t.lr_base_batch)
        schedule.check_lr(schedule_options(t), lr, source)
        names = tuple("+".join(g) for g in t.layer_groups) or ("all",)
        ratio = muon_source = None
        if t.optimizer == "muon" and used is not None and muon is not None:
            ratio = muon[0] / used
            muon_source = f"Muon's range test: {muon[1]} {muon[0]:.3g} x lr_factor {config.lr_finder.lr_factor:g}"
        elif t.optimizer == "muon":
            ratio, muon_source = t.muon.lr_ratio, f"train.muon.lr_ratio {t.muon.lr_ratio:g}"
        return cls(lr, "peak" if schedule.lr_is_peak else "initial", source, layer_scales(len(names), t.lr_ratio),
                   names, used, method if used is not None else None, ratio, muon_source, scale)

    @classmethod
    def _lr_free(cls, config, free: LrFree) -> LRPlan:
        """The plan of an LR-free optimizer (module docstring); an explicit lr is the recipe's
        (``train.lr`` in its keys: pydantic's ``model_fields_set``).

        Raises:
            LrlabError: ``train.lr_scale_rule`` other than none (the lr is a multiplier of the
                optimizer's own estimate, not an lr for some batch size).
        """
        t = config.train
        if t.lr_scale_rule != "none":
            raise LrlabError(f"train.lr_scale_rule {t.lr_scale_rule} does not apply to the LR-free train.optimizer "
                             f"{t.optimizer} (its lr is not meant for a batch size); set train.lr_scale_rule=none")
        name, notes = t.schedule, []
        if free.schedules is not None and name not in free.schedules:
            name = "constant"
            notes.append(f"train.schedule {t.schedule} replaced by constant: {free.source} is documented with "
                         f"{' or '.join(free.schedules)}")
        schedule = SCHEDULES.get(name)
        if schedule.lr_is_peak and t.max_lr is not None:
            lr, source = t.max_lr, "train.max_lr"
        elif "lr" in t.model_fields_set:
            lr, source = t.lr, "train.lr"
        else:
            lr, source = free.default_lr, f"LR-free optimizer: lr = {free.default_lr:g} (the package's default)"
        if t.max_lr is not None and not schedule.lr_is_peak:
            notes.append(f"train.max_lr {t.max_lr:g} not used: the {name} schedule has no peak")
        notes.append(f"no LR range test: train.optimizer {t.optimizer} is LR-free ({free.source})")
        schedule.check_lr(schedule_options(t), lr, source)
        names = tuple("+".join(g) for g in t.layer_groups) or ("all",)
        return cls(lr, "peak" if schedule.lr_is_peak else "initial", source, layer_scales(len(names), t.lr_ratio),
                   names, lr_free=True, schedule=None if name == t.schedule else name, notes=tuple(notes))

    @classmethod
    def check(cls, config, range_test_runs: bool) -> None:
        """Before any work: would :meth:`make` succeed? When the lr will come from a range test
        that has not run yet, nothing can be checked now (:meth:`make` checks its value later).

        Raises:
            LrlabError: as :meth:`make`.
        """
        if range_test_runs and lr_free(config.train.optimizer) is None:
            t = config.train
            if not (SCHEDULES.get(t.schedule).lr_is_peak and t.max_lr is not None):
                return  # the lr comes from the test; its value is checked when it is known
        cls.make(config, None)

    @property
    def group_lrs(self) -> tuple[float, ...]:
        """The lr of each layer group (bottom first) at the schedule's reference point."""
        return tuple(self.lr * s for s in self.scales)

    def rows(self) -> list[dict]:
        """One row per layer group (top first): group, lr, kind, source; for tables and reports.
        With Muon each group has a second row, "<group> (Muon)", at lr x ``muon_lr_ratio``."""
        rows = []
        for name, lr in reversed(list(zip(self.group_names, self.group_lrs))):
            rows.append({"group": name, "lr": lr, "kind": self.kind, "source": self.source})
            if self.muon_lr_ratio is not None:
                muon = self.muon_source or f"train.muon.lr_ratio {self.muon_lr_ratio:g}"  # plans saved before it
                source = muon if muon.startswith("Muon") else f"{self.source} x {muon}"
                rows.append({"group": f"{name} (Muon)", "lr": lr * self.muon_lr_ratio, "kind": self.kind,
                             "source": source})
        return rows

    def to_dict(self) -> dict:
        """JSON-ready dict; :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LRPlan:
        return cls(**{**data, "scales": tuple(data["scales"]), "group_names": tuple(data["group_names"]),
                      "notes": tuple(data.get("notes", ()))})
