"""The project's error types: an expected failure whose message says everything.

`p2s` prints an `Error` as one line (file, key, entry, shape or value named) and exits with
status 2; an interruption (Ctrl-C, SIGTERM) as one line saying what was kept, exit status
128 + the signal's number; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal


class Error(Exception):
    """An expected failure of a p2s_jax command; its message names the cause."""


class InputError(Error, ValueError):
    """A malformed or unsuitable input: a file, an argument, an entry of a dataset."""


class MissingFileError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received (raised by the handler `p2s` installs, like Ctrl-C's KeyboardInterrupt)."""

    signal_number = signal.SIGTERM


class Stopped(Error):
    """A command that stopped cleanly before its end because it was told to; the message says
    what was kept and how to go on (printed without "error:"), `exit_status` is the command's."""

    exit_status = 1


class Interrupted(Stopped):
    """A command stopped by Ctrl-C or SIGTERM.

    Attributes:
      signal_number: SIGINT or SIGTERM (the exit status is 128 + it).
    """

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal_number = int(signal_number)

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number

    @classmethod
    def from_interrupt(cls, interrupt: KeyboardInterrupt, message: str) -> "Interrupted":
        return cls(message, getattr(interrupt, "signal_number", signal.SIGINT))
