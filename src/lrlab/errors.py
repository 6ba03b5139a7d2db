"""The exceptions that reach the user as a one-sentence message, and the exit status of each."""


class LrlabError(Exception):
    """A problem with the user's input (file, key or value), stated in one sentence.

    The CLI prints ``error: <message>`` and exits with :attr:`exit_status` (2), without a traceback.
    The message names the offending file, key or value and says what would be valid.
    """

    exit_status = 2


class RunStopped(LrlabError):
    """A run that was under way ended early; its folder and every file already written in it are
    kept (so ``lrlab resume`` can go on). Subclasses give the exit status."""

    exit_status = 1


class WriteError(RunStopped):
    """A file could not be written (full disk, file-size limit, read-only or unwritable folder);
    the files written before it are intact. Exit status 1."""


class Diverged(RunStopped):
    """Training stopped at a non-finite loss (``train.on_nonfinite: stop``); the report was still
    written and says where and why. Exit status 3."""

    exit_status = 3
