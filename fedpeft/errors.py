"""User-facing errors.

A :class:`UsageError` is a mistake in the user's input (flag, config file, path). The CLI
prints its message on one line and exits with code 2 — never a traceback.
"""


class UsageError(ValueError):
    """Bad user input: the message names the value and what is allowed."""

