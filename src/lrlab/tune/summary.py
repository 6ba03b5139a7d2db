"""The summary folder of a study, ``<out>/<study>/`` (:class:`lrlab.run_folder.TuneFolder`),
rewritten from the study by every worker that finishes (the last one holds every trial):

    trials.csv       one row per trial: number, slot, stage, state, best validation accuracy
                     (the value Optuna maximises), the last epoch reported (pruned trials), lr and
                     the other axes, the test accuracies (reported only), retry_of, worker (host:pid),
                     run folder, note
    best.yaml        the best trial's config as a recipe (lrlab run best.yaml trains it again:
                     its lr is set, the range test off)
    history.png      every trial's validation accuracy in trial order, the best so far
    lr.png           lr against validation accuracy (stage 1's search, stage 2 at the chosen lr)
    importance.png   the stage-2 axes' importances (PED-ANOVA, Watanabe et al. 2023,
                     arXiv:2304.10255, Optuna's default), when stage 2 varied >= 2 axes
    tune.json        study, storage (password masked), budget, counts, lr range, best trial,
                     importances, the rows of trials.csv

The best trial is ranked by its validation accuracy only; the test columns are never read here
but to be printed.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrlab.config import save_config
from lrlab.run_folder import TuneFolder
from lrlab.tune import slots
from lrlab.tune.space import Space, trial_config

REPORTED = ("best_epoch", "epochs", "test_acc_at_best", "final_test_acc", "wall_seconds")
"""Per-trial numbers copied from its run's summary; the test accuracies are reported only."""


def _note(t: FrozenTrial, retried_as: dict[int, int]) -> str:
    """Why a trial has no value or a special one: skipped, its error, its divergence, or its
    worker's death (or interrupt) and its retry."""
    a = t.user_attrs
    note = a.get("skipped") or a.get("error") or a.get("diverged") or ""
    if not note and t.state == TrialState.FAIL:
        again = retried_as.get(t.number)
        note = "its worker stopped without a result (killed, lost or interrupted); " + (
            f"retried as trial {again}" if again is not None else "no retry left")
    return note


def trial_rows(trials: list[FrozenTrial], space: Space, budget: slots.Budget) -> list[dict]:
    """One dict per trial (the columns of trials.csv), in trial order."""
    index, rows = slots.slot_index(trials), []
    retried_as = {t.system_attrs[slots.HISTORY_ATTR][-1]: t.number for t in trials if t.system_attrs.get(slots.HISTORY_ATTR)}
    for t in sorted(trials, key=lambda t: t.number):
        slot = index.get(slots.origin(t))
        steps = sorted(t.intermediate_values)
        row = {"trial": t.number, "slot": slot, "stage": budget.stage(slot) if slot is not None else None,
               "state": "skipped" if "skipped" in t.user_attrs else t.state.name.lower(),
               "val_acc": t.value if t.state == TrialState.COMPLETE else None,
               "last_epoch_reported": steps[-1] if steps else None,
               "last_val_acc_reported": t.intermediate_values[steps[-1]] if steps else None,
               "lr": t.user_attrs.get("lr")}
        row.update({a.key: t.params.get(a.key) for a in space.others})
        row.update({k: t.user_attrs.get(k) for k in REPORTED})
        row.update(retry_of=t.system_attrs.get(slots.RETRIED_ATTR), worker=t.user_attrs.get("worker"),
                   run_dir=t.user_attrs.get("run_dir"), note=_note(t, retried_as))
        rows.append(row)
    return rows


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial of the highest validation accuracy (then the lowest number), or None."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and "skipped" not in t.user_attrs]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def importances(study: optuna.Study, space: Space) -> dict[str, float] | None:
    """Importance of each stage-2 axis (Optuna's default evaluator, PED-ANOVA) over the complete
    trials that have them; None with fewer than 2 axes, when those trials all reached the same
    accuracy, or when it cannot be computed."""
    keys = [a.key for a in space.others]
    values = {t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if set(keys) <= set(t.params)}
    if len(keys) < 2 or len(values) < 2:  # nothing varied: no importance to share out
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(study, params=keys)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    return {k: float(v) for k, v in found.items()} if all(math.isfinite(v) for v in found.values()) else None


def write_summary(folder: TuneFolder, study: optuna.Study, space: Space, budget: slots.Budget, storage: str,
                  lr_range: dict | None, recipe: str | Path | None, overrides: list[str]) -> dict:
    """Write the summary folder (see the module docstring) from the study; returns tune.json.

    Args:
        storage: the storage URL as shown (password masked); lr_range: stage 1's lr range and
            its source as stored in the study (None: the lr axis's own low/high).
        recipe, overrides: those of the command, from which best.yaml is made.
    """
    trials = study.get_trials(deepcopy=False)
    rows = trial_rows(trials, space, budget)
    best, found = best_trial(trials), importances(study, space)
    states = [r["state"] for r in rows]
    summary = {"tune_dir": str(folder), "study": study.study_name, "storage": storage,
               "budget": budget.trials, "lr_trials": budget.lr_trials, "lr_axis": space.lr.key,
               "counts": {s: states.count(s) for s in ("complete", "pruned", "fail", "running", "waiting", "skipped")},
               "lr_range": lr_range, "importances": found, "best": None, "rows": rows}
    if best is not None:
        values = {k: v for k, v in best.params.items() if k != space.lr.key}
        lr = best.user_attrs.get("lr", best.params.get(space.lr.key))
        config = trial_config(recipe, overrides, values, lr, f"{study.study_name}-best")
        save_config(config, folder.file("best_recipe"))
        summary["best"] = next(r for r in rows if r["trial"] == best.number)
    bounds = lr_range["range"] if lr_range else (space.lr.param.low, space.lr.param.high)
    folder.save(rows, _csv(rows), summary, found, tuple(bounds) if bounds[0] is not None else None)
    return summary
