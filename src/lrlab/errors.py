"""The one exception type that reaches the user as a one-sentence message."""


class LrlabError(Exception):
    """A problem with the user's input (file, key or value), stated in one sentence.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    The message names the offending file, key or value and says what would be valid.
    """
