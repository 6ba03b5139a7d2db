"""SIGINT (Ctrl-C) and SIGTERM (``kill``, a preempted VM, a batch scheduler) during a command.

The ``lrlab`` command installs :func:`handle_signals` around its work. Outside training a signal
stops the command at once by raising :class:`Interrupted`. Inside the training loop
(:func:`deferring`) the first signal is only recorded: the loop finishes the optimizer step it is
in, writes a checkpoint and then raises :class:`Interrupted` (see :func:`lrlab.engine.fit`); a
second signal stops at once. Library users who install nothing get Python's usual
KeyboardInterrupt on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None
_deferring = False


class Interrupted(KeyboardInterrupt):
    """The command was stopped by signal ``signum``; exit status 128 + signum (130 for SIGINT,
    143 for SIGTERM). ``where`` says how far it got ("" when not known), ``run_dir`` (set by the
    pipeline) is the run folder to resume."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where = signum, where
        self.run_dir = None

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Route SIGINT and SIGTERM through this module while the block runs (main thread only);
    the previous handlers are restored on exit."""
    global _pending
    _pending = None
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """While the block runs, the first SIGINT/SIGTERM is recorded (:func:`pending`) instead of
    raised, so the caller can finish a step and save its state."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False


def pending() -> int | None:
    """The signal number received while :func:`deferring`, or None."""
    return _pending
