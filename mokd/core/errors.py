"""The one exception type for mistakes a user can fix.

The CLI prints a `MokdError` as a single line and exits non-zero, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

EXIT_USER_ERROR = 2  # the exit status of a user error, on the command line and in a SLURM job

# The last line of a formatted traceback: "[package.module.]SomeError: message".
_FINAL_LINE = re.compile(r"^(?:[\w]+\.)*\w+: (?P<message>.*)$")


class MokdError(Exception):
    """A user-facing error: say what is wrong, which file, and what to do.

    A DataLoader worker that raises one is re-raised in the main process by calling this class with
    the worker's whole traceback as the message ("Caught MokdError in DataLoader worker process 0.
    Original Traceback ..."); the constructor keeps only the user's line, so an error reads the same
    with and without workers.
    """

    printed = True  # whether the command line shows it (False on the quiet ranks of a SharedMokdError)

    def __init__(self, message: str = "") -> None:
        super().__init__(_user_line(message))


class SharedMokdError(MokdError):
    """A user error that every rank of a distributed run raises together, having learnt it from rank 0 (so none
    is left waiting in a collective): only rank 0 prints it, and the run shows it once."""

    def __init__(self, message: str, *, printed: bool) -> None:
        super().__init__(message)
        self.printed = printed


def _user_line(message: str) -> str:
    if "Original Traceback" not in message:
        return message
    last = next((line for line in reversed(message.splitlines()) if line.strip()), "")
    match = _FINAL_LINE.match(last.strip())
    return match.group("message") if match else last.strip()
