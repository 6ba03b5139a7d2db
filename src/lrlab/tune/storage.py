"""``--storage URL`` -> the Optuna storage that every worker of a study shares, with heartbeats.

    sqlite:///PATH          one machine (SQLite's file locks do not hold on network file systems)
    postgresql://USER:PASSWORD@HOST:PORT/DB   any number of machines (SQLAlchemy + psycopg2)
    journal:PATH            a journal file on a disk every worker sees (Optuna's JournalStorage)

A worker that dies (SIGKILL, a lost machine) leaves its trial RUNNING; Optuna's heartbeat turns
it into FAIL and re-queues it (``RetryHeartbeatStaleTrialCallback``): a running trial's worker
records a heartbeat every ``tune.heartbeat_interval`` seconds, and before each new trial a
worker fails the running trials whose last heartbeat is older than ``tune.grace_period``. Optuna
5.0 implements heartbeats for RDB storages only; :class:`JournalHeartbeatStorage` gives the
journal storage the same ``BaseHeartbeat`` interface, so the same Optuna code does the rest.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path

from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # the interface RDBStorage implements
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError

from lrlab.errors import LrlabError

FORMS = ("sqlite:///PATH (one machine only), postgresql://USER:PASSWORD@HOST:PORT/DB (a local socket: "
         "postgresql://USER@/DB?host=SOCKET_DIR), journal:PATH (a file on a disk every worker sees)")
"""The valid ``--storage`` forms, for messages."""

HEARTBEAT_ATTR = "lrlab:heartbeat"
"""The system attribute of a running trial in a journal storage: the time of its last heartbeat
(seconds since the epoch, the worker's clock)."""


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with the ``BaseHeartbeat`` interface: the heartbeat is the
    worker's time in the trial's system attribute :data:`HEARTBEAT_ATTR`; a RUNNING trial whose
    last heartbeat (or start) is more than ``grace_period`` seconds old is stale. The workers'
    clocks must agree to well within the grace period (NTP).

    Args:
        backend: the journal backend (``JournalFileBackend``).
        interval: seconds between heartbeats; grace_period: seconds until a trial is stale.
        callback: called with (study, failed trial) for each stale trial failed (a retry).
    """

    def __init__(self, backend, interval: int, grace_period: int, callback):
        super().__init__(backend)
        self._interval, self._grace, self._callback = interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:  # another worker already failed it as stale
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running
                if now - t.system_attrs.get(HEARTBEAT_ATTR, t.datetime_start.timestamp()) > self._grace]

    def get_heartbeat_interval(self) -> int:
        return self._interval

    def get_heartbeat_stale_trial_callback(self):
        return self._callback


def masked(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and tune.json)."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, userinfo = head.partition("://")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{tail}"


def open_storage(url: str, heartbeat_interval: int, grace_period: int | None, max_retry: int):
    """The Optuna storage named by ``url`` (see the module docstring), with heartbeats every
    ``heartbeat_interval`` seconds, trials failed after ``grace_period`` seconds without one
    (None: twice the interval) and re-queued up to ``max_retry`` times.

    Raises:
        LrlabError: a URL of another form, or one that cannot be opened (no such folder, server
            not reachable, authentication failed, ...), naming it and the valid forms.
    """
    grace = grace_period or 2 * heartbeat_interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        try:
            if url.startswith("journal:"):
                return _open_journal(url.removeprefix("journal:"), heartbeat_interval, grace, retry)
            scheme = url.partition(":")[0]
            if scheme != "sqlite" and scheme.partition("+")[0] != "postgresql":
                raise LrlabError(f"--storage {masked(url)!r} is not a storage URL; valid forms: {FORMS}")
            return _open_rdb(url, scheme, heartbeat_interval, grace, retry)
        except LrlabError:
            raise
        except Exception as e:  # the driver's or SQLAlchemy's errors: the first line says why
            why = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LrlabError(f"--storage {masked(url)!r} cannot be opened ({why}); valid forms: {FORMS}") from None


def _open_journal(path: str, interval: int, grace: int, retry):
    """A :class:`JournalHeartbeatStorage` on the journal file ``path`` (created if missing, in
    an existing folder)."""
    if not path:
        raise LrlabError(f"--storage 'journal:' names no file; valid forms: {FORMS}")
    if not Path(path).parent.is_dir():
        raise LrlabError(f"--storage 'journal:{path}' cannot be opened (folder {Path(path).parent} does not exist); "
                         f"valid forms: {FORMS}")
    return JournalHeartbeatStorage(JournalFileBackend(path), interval, grace, retry)


def _open_rdb(url: str, scheme: str, interval: int, grace: int, retry, attempts: int = 5):
    """Optuna's RDBStorage on ``url`` with its own heartbeat (SQLite waits up to 60 s for a
    lock held by another worker of the same machine). Workers that open a new, empty database at
    the same moment all try to create Optuna's tables, and all but one fail (optuna/optuna#1092):
    those try again after a short random pause, when the tables exist."""
    engine = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=interval, grace_period=grace,
                              heartbeat_stale_trial_callback=retry)
        except DBAPIError as e:
            race = isinstance(e, (IntegrityError, ProgrammingError)) or "already exists" in str(e)
            if not race or attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())
