"""Errors a user can cause (bad option, missing data, malformed file).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2;
any other exception is a bug in localcredit and keeps its traceback (exit 1).
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
