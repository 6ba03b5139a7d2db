"""One worker of an ``lrlab tune`` study: any number of them, on any number of machines, run the
same command with the same ``--study`` and ``--storage`` and share the trials.

    lrlab tune RECIPE --study NAME --storage URL [--trials K] [--out DIR] [section.key=value ...]

1. Everything that can reject the input is checked first: the recipe, the search space
   (:func:`lrlab.tune.space.search_space`), the storage URL, the data and model of a trial.
2. The study is created or joined (``load_if_exists``); a study started with another search
   space or another ``tune.lr_trials`` is refused.
3. Stage 1's lr range: the lr axis's low/high, or the LR range test (one ``lrlab find-lr`` run
   folder under ``trials/``) times ``tune.lr_range_factors``; it runs once per study (its range is
   stored in the study; workers that start at the same moment may each run it, and all use the
   one stored last, the same up to floating-point noise, as it is seeded).
4. Trials until the budget is done (:mod:`lrlab.tune.slots`): each is a normal run folder
   (``lrlab train`` with the trial's values: :func:`lrlab.tune.space.trial_config`) under
   ``<out>/<study>/trials/``, whose path is the trial's user attribute ``run_dir``. Each epoch's
   validation accuracy is reported to Optuna, which may prune the trial; the trial's value is its
   best validation accuracy (the test accuracy is recorded, never used). A trial whose training
   diverged is complete with the best accuracy it reached (0 before its first epoch), so the
   sampler learns the region is bad; one that raised is FAIL with its ``error``.
5. The summary folder ``<out>/<study>/`` (:mod:`lrlab.tune.summary`).

The sampler is Optuna's TPE (Bergstra et al. 2011) with the constant liar for parallel workers,
seeded from ``seed``, the host and the process, so concurrent workers draw different points.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from lrlab.config import Config, load_config
from lrlab.errors import Diverged, LrlabError
from lrlab.io import check_writable
from lrlab.pipeline import Callbacks, prepare, run_pipeline
from lrlab.run_folder import RunFolder, TuneFolder
from lrlab.tune import slots
from lrlab.tune.pruners import build_pruner
from lrlab.tune.space import Space, search_space, trial_config
from lrlab.tune.storage import masked, open_storage
from lrlab.tune.summary import write_summary

SPACE_ATTR, LR_RANGE_ATTR = "lrlab:space", "lrlab:lr_range"
"""Study user attributes: the search space and stage-1 size every worker must share; stage 1's
lr range (and where it came from)."""

POLL_SECONDS = 2.0
"""How often a waiting worker looks at the study again."""


class _Skipped(Exception):
    """A trial opened beyond the budget (see :mod:`lrlab.tune.slots`); it is FAIL, not trained."""


def worker_seed(seed: int) -> int:
    """The sampler seed of this worker: ``seed`` mixed with the host name and process id."""
    text = f"{seed}:{socket.gethostname()}:{os.getpid()}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


class Worker:
    """One worker of the study ``name``: see the module docstring.

    Args:
        recipe, overrides: the recipe and the command's ``section.key=value`` overrides.
        config: their validated config; space: its checked search space.
        study: the Optuna study (created or joined); folder: the summary folder.
        callbacks: progress of every trial's run (``lrlab.pipeline.Callbacks``).
        on_trial: called as (trial number, stage, {key: value}) before a trial trains.
    """

    def __init__(self, recipe, overrides: list[str], config: Config, space: Space, study: optuna.Study,
                 folder: TuneFolder, callbacks: Callbacks, on_trial: Callable[[int, int, dict], None] | None):
        self.recipe, self.overrides, self.config, self.space = recipe, overrides, config, space
        self.study, self.folder, self.callbacks, self.on_trial = study, folder, callbacks, on_trial
        self.budget = slots.Budget(config.tune.trials, config.tune.lr_trials)
        self.bounds: tuple[float, float] | None = None
        self.current: int | None = None

    def run(self) -> None:
        """Stage 1's lr range first when stage 1 has slots to open (so a range test without a
        suggestion is one error of the command), then trials until every slot of the budget is
        done (waiting when told to)."""
        if len(slots.slot_index(self.study.get_trials(deepcopy=False))) < self.budget.lr_trials:
            self.bounds = self.lr_range()
        while True:
            step = slots.next_step(self.study.get_trials(deepcopy=False), self.budget)
            if step == slots.STOP:
                return
            if step == slots.WAIT:
                self.wait()
                continue
            try:
                self.study.optimize(self.objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            except UpdateFinishedTrialError:
                continue  # failed as stale by another worker while alive (late heartbeats): its retry runs it
            except KeyboardInterrupt as e:
                self.requeue()
                e.run_dir = None  # the study goes on with the same lrlab tune command, not lrlab resume
                raise

    def wait(self) -> None:
        """Sleep a little, then fail the trials of dead workers (they come back as retries)."""
        time.sleep(POLL_SECONDS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            fail_stale_trials(self.study)

    def requeue(self) -> None:
        """Queue the trial a SIGINT/SIGTERM stopped (Optuna marked it FAIL) again, as a dead
        worker's would be."""
        if self.current is None:
            return
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.current)
        if trial.state == TrialState.FAIL:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback(max_retry=self.config.tune.max_retry)(self.study, trial)

    def lr_range(self) -> tuple[float, float]:
        """Stage 1's lr range: the axis's own, else the study's stored one, else the range test's
        (run here, then stored)."""
        p = self.space.lr.param
        if p.low is not None:
            return p.low, p.high
        stored = self.study.user_attrs.get(LR_RANGE_ATTR)
        if stored is None:
            name = f"{self.study.study_name}-range-test"
            config = load_config(self.recipe, [*self.overrides, "lr_finder.enabled=true", f"name={name}"])
            s = run_pipeline(config, self.folder.file("trials_dir"), self.callbacks, command="find-lr",
                             range_test_stage=True, train_stage=False, explain_stage=False).summary
            lr = s["lr_suggestion"] * config.lr_finder.lr_factor  # not train.max_lr, when the recipe sets it
            low, high = (lr * f for f in self.config.tune.lr_range_factors)
            self.study.set_user_attr(LR_RANGE_ATTR, {"range": [low, high], "lr": lr,
                                                     "method": s.get("lr_method"), "run_dir": s["run_dir"]})
            stored = self.study.user_attrs[LR_RANGE_ATTR]
        return tuple(stored["range"])

    def objective(self, trial: optuna.Trial) -> float:
        """One trial: its slot and stage from the study, its values, its run folder; returns its
        best validation accuracy."""
        self.current = trial.number
        trials = self.study.get_trials(deepcopy=False)
        slot = slots.slot_of(trials, next(t for t in trials if t.number == trial.number))
        stage = self.budget.stage(slot)
        if stage is None:
            trial.set_user_attr("skipped", "opened beyond the budget while another worker took the last slot")
            raise _Skipped(f"trial {trial.number} is beyond the budget of {self.budget.trials} trials")
        for key, value in (("slot", slot), ("stage", stage), ("worker", f"{socket.gethostname()}:{os.getpid()}")):
            trial.set_user_attr(key, value)
        if stage == 1:
            self.bounds = self.bounds or self.lr_range()
            lr = self.space.lr.suggest(trial, *self.bounds)
            values = {self.space.lr.key: lr}
        else:
            lr = self.stage1_lr()
            values = {a.key: a.suggest(trial) for a in self.space.others}
        trial.set_user_attr("lr", lr)
        name = f"{self.study.study_name}-trial{trial.number:04d}"
        config = trial_config(self.recipe, self.overrides, values, lr, name)
        if self.on_trial is not None:
            self.on_trial(trial.number, stage, {self.space.lr.key: lr, **values})
        return self.train(trial, config, name)

    def stage1_lr(self) -> float:
        """The lr of the best complete stage-1 trial (highest validation accuracy, then the
        lowest number), once stage 1 is done.

        Raises:
            LrlabError: no stage-1 trial completed.
        """
        trials = self.study.get_trials(deepcopy=False)
        while not slots.stage1_done(trials, self.budget):
            self.wait()
            trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE and "skipped" not in t.user_attrs
                and self.budget.stage(slots.slot_of(trials, t)) == 1]
        if not done:
            raise LrlabError("no stage-1 trial completed (every one failed or was pruned), so stage 2 has no lr; "
                             "see the errors in the summary folder's trials table")
        return max(done, key=lambda t: (t.value, -t.number)).params[self.space.lr.key]

    def train(self, trial: optuna.Trial, config: Config, name: str) -> float:
        """Train the trial's run folder, reporting each epoch's validation accuracy (pruning);
        record its folder and reported-only figures in the trial."""
        trials_dir = self.folder.file("trials_dir")
        try:
            summary = run_pipeline(config, trials_dir, self.trial_callbacks(trial, trials_dir, name), command="train",
                                   range_test_stage=False, train_stage=True, explain_stage=False).summary
        except Diverged as e:
            trial.set_user_attr("diverged", str(e))
            summary = RunFolder(trial.user_attrs["run_dir"]).read_json("summary") or {}
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("error", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        for key in ("best_epoch", "epochs", "test_acc_at_best", "final_test_acc", "wall_seconds"):
            if summary.get(key) is not None:
                trial.set_user_attr(key, summary[key])
        return summary.get("best_val_acc") or 0.0

    def trial_callbacks(self, trial: optuna.Trial, trials_dir: Path, name: str) -> Callbacks:
        """The progress callbacks, plus: the run folder into the trial when it exists, and each
        epoch's validation accuracy to Optuna (raising TrialPruned when the pruner says so)."""
        outer = self.callbacks

        def on_stage(stage: str, total: int) -> None:  # the folder exists now (a retry inherited the old one's)
            trial.set_user_attr("run_dir", str(sorted(trials_dir.glob(f"{name}-[0-9]*"))[-1]))
            outer.stage(stage, total)

        def on_epoch(record: dict) -> None:
            if outer.on_epoch is not None:
                outer.on_epoch(record)
            trial.report(record["val_acc"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} at val acc {record['val_acc']:.4f}")

        return Callbacks(on_stage=on_stage, on_step=outer.on_step, on_epoch=on_epoch)


def _join_study(name: str, storage, config: Config, space: Space) -> optuna.Study:
    """Create or load the study ``name``; store or compare its search space and stage-1 size.

    Raises:
        LrlabError: the study was started with another space or ``tune.lr_trials``.
    """
    t = config.tune
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=worker_seed(config.seed), constant_liar=True,
                                             n_startup_trials=max(2, t.lr_trials // 2))
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                    sampler=sampler, pruner=build_pruner(t.pruner))
    mine = {"space": space.as_dict(), "lr_trials": t.lr_trials}
    if SPACE_ATTR not in study.user_attrs:
        study.set_user_attr(SPACE_ATTR, mine)
    theirs = study.user_attrs[SPACE_ATTR]
    differ = [f"tune.{k} {theirs[k]} (this recipe: {mine[k]})" for k in ("lr_trials", "space") if theirs[k] != mine[k]]
    if differ:
        raise LrlabError(f"study {name!r} was started with {' and '.join(differ)}; use the same recipe, or another --study")
    return study


def _check_trial(recipe, overrides: list[str], config: Config, space: Space) -> None:
    """Load the data and build the model of a trial at the lowest values, so a bad data path or
    model is one error before any work (:func:`lrlab.pipeline.prepare`)."""
    values = {a.key: a.ends()[0] for a in space.others}
    lr = space.lr.param.low or config.train.lr
    prepare(trial_config(recipe, overrides, values, lr, config.name), range_test=False, train=True, explain=False)


def run_tune(recipe: str | Path | None, overrides: list[str], *, study_name: str | None = None,
             storage: str | None = None, trials: int | None = None, out: str | Path = "runs",
             callbacks: Callbacks = Callbacks(), on_trial: Callable[[int, int, dict], None] | None = None) -> dict:
    """``lrlab tune``: join (or start) the study and run trials until its budget is done, then
    write the summary folder ``<out>/<study>/``; returns the summary (tune.json).

    Args:
        recipe, overrides: the recipe (with its ``tune`` section) and ``section.key=value``s.
        study_name: the study (default: the recipe's ``name``).
        storage: a storage URL (:data:`lrlab.tune.storage.FORMS`; default: a SQLite file in the
            summary folder, one machine only).
        trials: the budget, instead of ``tune.trials``.
        out: parent of the summary folder.

    Raises:
        LrlabError: bad input (recipe, data.val_split=test, space, storage, data, model), one
            sentence; WriteError: ``out`` is not writable; Interrupted: SIGINT/SIGTERM (the
            trial is queued again).
    """
    overrides = list(overrides) + ([f"tune.trials={trials}"] if trials is not None else [])
    config = load_config(recipe, overrides)
    if config.data.val_split != "val":
        raise LrlabError("lrlab tune ranks trials by the validation split, and data.val_split=test would make it "
                         "the test split; use data.val_split=val (the test split is only reported)")
    space = search_space(config, recipe, overrides)
    check_writable(out, "output folder")
    t, name = config.tune, study_name or config.name
    shared = open_storage(storage, t.heartbeat_interval, t.grace_period, t.max_retry) if storage else None
    _check_trial(recipe, overrides, config, space)
    folder = TuneFolder.create(out, name)
    url = storage or f"sqlite:///{folder.file('study_db').resolve()}"
    shared = shared or open_storage(url, t.heartbeat_interval, t.grace_period, t.max_retry)
    study = _join_study(name, shared, config, space)
    Worker(recipe, overrides, config, space, study, folder, callbacks, on_trial).run()
    return write_summary(folder, study, space, slots.Budget(t.trials, t.lr_trials), masked(url),
                         study.user_attrs.get(LR_RANGE_ATTR), recipe, overrides)
