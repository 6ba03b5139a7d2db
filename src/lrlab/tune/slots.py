"""The study's budget in slots, and what a worker does next: derived from the study's trials
alone, never from a worker's own state, so any number of workers on any number of machines
agree.

A *slot* is one unit of the budget (``tune.trials``). Every trial that is not a retry opens the
next slot, in trial-number order (the storage numbers trials atomically); a retry (a trial
re-queued by Optuna's ``RetryHeartbeatStaleTrialCallback`` after its worker died) belongs to the
slot of the trial it retries. Slots ``0 .. lr_trials - 1`` are stage 1 (the lr alone), the rest
up to ``trials - 1`` stage 2; a trial opened beyond the budget (two workers asking for the last
slot at the same moment) is skipped. A slot is *pending* while one of its trials is RUNNING or
WAITING, and *done* after that: COMPLETE, PRUNED, or FAIL (not retried any more).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

RETRIED_ATTR, HISTORY_ATTR = "failed_trial", "retry_history"
"""``RetryHeartbeatStaleTrialCallback``'s system attributes on a retry: the number of the first
trial of its retry series, and the numbers of the trials it retries, first to last."""

PENDING = (TrialState.RUNNING, TrialState.WAITING)
RUN, WAIT, STOP = "run", "wait", "stop"


@dataclass(frozen=True)
class Budget:
    """``tune.trials`` slots, the first ``lr_trials`` of them stage 1."""

    trials: int
    lr_trials: int

    def stage(self, slot: int) -> int | None:
        """1 (the lr alone), 2 (the other axes), or None (beyond the budget: skipped)."""
        return 1 if slot < self.lr_trials else 2 if slot < self.trials else None


def origin(trial: FrozenTrial) -> int:
    """The number of the trial whose slot ``trial`` fills (itself unless it is a retry)."""
    return trial.system_attrs.get(RETRIED_ATTR, trial.number)


def slot_index(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Trial number of every trial that is not a retry -> its slot."""
    fresh = sorted(t.number for t in trials if RETRIED_ATTR not in t.system_attrs)
    return {number: i for i, number in enumerate(fresh)}


def slot_of(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> int:
    """The slot of ``trial``, one of ``trials`` (the study's trials)."""
    return slot_index(trials)[origin(trial)]


def pending_slots(trials: Sequence[FrozenTrial]) -> set[int]:
    """The slots that have a RUNNING or WAITING trial."""
    index = slot_index(trials)
    return {index[origin(t)] for t in trials if t.state in PENDING}


def stage1_done(trials: Sequence[FrozenTrial], budget: Budget) -> bool:
    """True when every stage-1 slot is open and done."""
    return (len(slot_index(trials)) >= budget.lr_trials
            and not any(s < budget.lr_trials for s in pending_slots(trials)))


def next_step(trials: Sequence[FrozenTrial], budget: Budget) -> str:
    """What a worker does next: :data:`RUN` a trial (a queued retry first, else the next slot),
    :data:`WAIT` (stage 2 waits for stage 1 to be done; the last slots are being trained
    elsewhere, and a dead worker's trial may still come back as a retry), or :data:`STOP`
    (every slot of the budget is done)."""
    if any(t.state == TrialState.WAITING for t in trials):
        return RUN
    opened, pending = len(slot_index(trials)), pending_slots(trials)
    if opened < budget.lr_trials:
        return RUN
    if opened < budget.trials:
        return WAIT if any(s < budget.lr_trials for s in pending) else RUN
    return WAIT if any(s < budget.trials for s in pending) else STOP
