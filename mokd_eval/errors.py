"""The one exception type for mistakes a user can fix.

The CLI prints a `MokdError` as a single line and exits non-zero, without a traceback;
anything else is a bug and keeps its traceback.
"""


class MokdError(Exception):
    """A user-facing error: say what is wrong, which file, and what to do."""
