"""``tune.space`` -> checked axes, and a trial's values -> its :class:`~lrlab.config.Config`.

The space maps config keys to :class:`~lrlab.config.TuneParam` ranges or choices. One axis is the
learning rate, ``train.lr`` or ``train.max_lr``: stage 1 searches it alone (log-uniform), stage 2
the other axes at stage 1's best lr. A trial's lr is written into both keys, so whichever the
trial's schedule reads (:class:`lrlab.lr_plan.LRPlan`: max_lr for one-cycle and cyclic, lr for
the others) is the searched one; trials run without a range test (``lr_finder.enabled=false``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lrlab.compare import check_key
from lrlab.config import Config, TuneParam, load_config
from lrlab.errors import LrlabError
from lrlab.optim import lr_free

LR_KEYS = ("train.lr", "train.max_lr")
"""The keys of the lr axis; a trial sets both to its lr."""

SCALARS = (bool, int, float, str)
"""The types Optuna's categorical distribution takes as choices (None aside)."""


@dataclass(frozen=True)
class Axis:
    """One axis of the search space.

    Attributes:
        key: the config key (``section.key``), also the Optuna parameter name.
        param: its range or choices.
        integer: the key is an int (train.batch_size): a range draws integers.
    """

    key: str
    param: TuneParam
    integer: bool = False

    def suggest(self, trial, low: float | None = None, high: float | None = None) -> Any:
        """Draw this axis's value for the Optuna ``trial`` (``low``/``high`` replace a range's
        bounds: the lr axis's from the range test)."""
        p = self.param
        if p.choices is not None:
            return trial.suggest_categorical(self.key, p.choices)
        low, high = (p.low, p.high) if low is None else (low, high)
        if self.integer:
            return trial.suggest_int(self.key, int(low), int(high), log=p.log)
        return trial.suggest_float(self.key, low, high, log=p.log)

    def ends(self) -> list:
        """Every choice, or the two ends of the range (integers for an int key)."""
        p = self.param
        if p.choices is not None:
            return list(p.choices)
        return [int(p.low), int(p.high)] if self.integer else [p.low, p.high]


@dataclass(frozen=True)
class Space:
    """The checked search space: the lr axis (stage 1) and the others (stage 2)."""

    lr: Axis
    others: tuple[Axis, ...]

    def as_dict(self) -> dict:
        """JSON-able form, stored in the study so that every worker searches the same space."""
        return {a.key: a.param.model_dump(mode="json", exclude_none=True) for a in (self.lr, *self.others)}


def override(key: str, value: Any) -> str:
    """``key=value`` with the value as YAML flow text, read back exactly by ``load_config``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20)
    return f"{key}={text.removesuffix(chr(10)).removesuffix('...').strip()}"


def trial_overrides(values: dict[str, Any], lr: float, name: str) -> list[str]:
    """The overrides of one trial: its axis values (the lr into both :data:`LR_KEYS`), no range
    test, and its run's name."""
    out = [override(k, v) for k, v in values.items() if k not in LR_KEYS]
    return out + [override(k, lr) for k in LR_KEYS] + ["lr_finder.enabled=false", override("name", name)]


def trial_config(recipe: str | Path | None, overrides: list[str], values: dict[str, Any], lr: float,
                 name: str) -> Config:
    """The config of one trial: the recipe, the command's overrides, then the trial's.

    Raises:
        LrlabError: as :func:`lrlab.config.load_config`.
    """
    return load_config(recipe, list(overrides) + trial_overrides(values, lr, name))


def _annotation(key: str) -> Any:
    """The type annotation of config key ``key`` (None below a free-form mapping)."""
    model: type[BaseModel] = Config
    annotation = None
    for part in key.split("."):
        annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) is dict:
            return None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return annotation


def _axis(key: str, param: TuneParam) -> Axis:
    """One checked axis (its key exists, the lr axis is a range or empty, the others are not
    empty, choices are scalars).

    Raises:
        LrlabError: naming the key.
    """
    check_key(key, "tune.space")
    if key in LR_KEYS:
        if param.choices is not None or (param.low is not None and param.low <= 0):
            raise LrlabError(f"tune.space.{key}: the lr axis is a log-uniform range: give low > 0 and high, "
                             f"or nothing to take the range from the LR range test")
        return Axis(key, param.model_copy(update={"log": True}))
    if param.choices is None and param.low is None:
        raise LrlabError(f"tune.space.{key}: give a range (low, high) or choices")
    bad = [c for c in param.choices or [] if not isinstance(c, SCALARS)]
    if bad:
        raise LrlabError(f"tune.space.{key}: choice {bad[0]!r} is not a number, string or boolean")
    return Axis(key, param, _annotation(key) is int)


def search_space(config: Config, recipe: str | Path | None, overrides: list[str]) -> Space:
    """The checked search space of ``config.tune.space``; every end of every range and every
    choice is loaded into a trial config, so a value the config rejects is found before any work.

    Raises:
        LrlabError: an empty space, an unknown key (the valid ones listed), no lr axis or two, no
            other axis for stage 2, an empty range (reported by the config), or a value the config
            rejects, an lr axis without a range for an LR-free optimizer (no range test seeds it).
    """
    space = config.tune.space
    if not space:
        raise LrlabError("tune.space is empty; give at least the lr axis, e.g. tune.space: {train.max_lr: {}}")
    axes = [_axis(key, param) for key, param in space.items()]
    lrs = [a for a in axes if a.key in LR_KEYS]
    if len(lrs) != 1:
        found = " and ".join(a.key for a in lrs) or "none"
        raise LrlabError(f"tune.space needs exactly one lr axis, {' or '.join(LR_KEYS)}, which stage 1 "
                         f"searches; found {found}")
    result = Space(lrs[0], tuple(a for a in axes if a.key not in LR_KEYS))
    if result.lr.param.low is None and lr_free(config.train.optimizer) is not None:
        raise LrlabError(f"tune.space.{result.lr.key} needs low and high with the LR-free train.optimizer "
                         f"{config.train.optimizer}: there is no LR range test to seed its range (e.g. "
                         f"{{low: 0.1, high: 10, log: true}} around the package's default)")
    if not result.others and config.tune.trials > config.tune.lr_trials:
        raise LrlabError(f"tune.space has no axis but the lr for stage 2's {config.tune.trials - config.tune.lr_trials} "
                         f"trials; add one (e.g. train.weight_decay) or set tune.lr_trials = tune.trials")
    lr = lrs[0].param.low or config.train.lr
    for a in result.others:
        for value in a.ends():
            try:
                trial_config(recipe, overrides, {a.key: value}, lr, config.name)
            except LrlabError as e:
                raise LrlabError(f"tune.space.{a.key} value {value!r}: {e}") from None
    return result
