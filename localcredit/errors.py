"""Errors a user can cause (bad option, missing data, malformed file).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2;
any other exception is a bug in localcredit and keeps its traceback (exit 1).
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def did_you_mean(word: str, choices) -> str:
    """``" (did you mean 'epochs'?)"`` when ``word`` is close to one of ``choices``, else ``""``: the end of a
    one-line error about a misspelled name."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
