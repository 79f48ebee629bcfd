"""The project's error types: an expected failure whose message says everything.

`p2s` prints an `Error` as one line (file, key, entry, shape or value named) and exits with
status 2; an interruption (Ctrl-C, SIGTERM) as one line saying what was kept, exit status
128 + the signal's number; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import signal
import sys
import threading


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


# The signals `raise_interrupt` turned into exceptions inside `raise_on_signals`, newest last.
# Signals are the process's, so is this record: it lets `interrupt_signal` recognise an
# interruption that a library re-raised as another error (JAX turns a KeyboardInterrupt raised
# while it compares static arguments into a ValueError that keeps only its text).
_RECEIVED: list[int] = []


def raise_interrupt(signum: int, frame=None):
    """Signal handler: records `signum` and raises KeyboardInterrupt (SIGINT) or `Terminated`."""
    _RECEIVED.append(int(signum))
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _answered_by(handler, numbers):
    """Inside, `handler` answers the signals `numbers` -> those it answers (none outside the
    main thread, where no handler can be installed); the previous handlers come back on exit."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, handler) for number in numbers}
    try:
        yield list(previous)
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)


@contextlib.contextmanager
def raise_on_signals(sigterm: bool = True):
    """Inside, Ctrl-C (and SIGTERM, unless `sigterm` is False: JAX's preemption notifier keeps
    it on a multi-process run) raise in the main thread through `raise_interrupt`; the previous
    handlers come back on exit. One raised where Python can only print it is delivered again
    (`_deliver_again`). Outside the main thread nothing is installed."""
    numbers = [signal.SIGINT] + ([signal.SIGTERM] if sigterm else [])
    with _answered_by(raise_interrupt, numbers) as answered:
        _RECEIVED.clear()
        hook = sys.unraisablehook
        if answered:
            sys.unraisablehook = functools.partial(_deliver_again, hook)
        try:
            yield
        finally:
            sys.unraisablehook = hook
            _RECEIVED.clear()


def _deliver_again(hook, unraisable) -> None:
    """`sys.unraisablehook` inside `raise_on_signals`: an interruption raised where Python can
    only print it (a garbage collector's callback, such as JAX's, or a `__del__`) would be
    lost; it is delivered again to the main thread 20 ms later, from another thread, so that it
    lands once that code has returned (should it land in such code again, it comes back here).
    Anything else goes to `hook`."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _RECEIVED:
        number = int(getattr(unraisable.exc_value, "signal_number", signal.SIGINT))
        again = threading.Timer(0.02, _thread.interrupt_main, args=(number,))
        again.daemon = True
        again.start()
        return
    hook(unraisable)


@contextlib.contextmanager
def signals_held(numbers=(signal.SIGINT, signal.SIGTERM)):
    """Inside, the signals `numbers` wait: one that arrives is acted on when the block ends, by
    the handler it would have met (a bookkeeping step, such as a pool starting a worker, then
    never stops halfway). Only the main thread can hold them; elsewhere, and for a signal
    whose handler was not installed from Python, the block runs as it is."""
    arrived = []
    numbers = [number for number in numbers if signal.getsignal(number) is not None]
    try:
        with _answered_by(lambda signum, frame: arrived.append(signum), numbers):
            yield
    finally:
        if arrived:
            signal.raise_signal(arrived[0])


def interrupt_signal(err: BaseException) -> int | None:
    """The signal that `err` ends with (SIGINT or SIGTERM), or None when it is no interruption:
    a KeyboardInterrupt's own, else the last signal `raise_interrupt` turned into an exception
    (which a library may have re-raised as another error)."""
    if isinstance(err, KeyboardInterrupt):
        return int(getattr(err, "signal_number", signal.SIGINT))
    return _RECEIVED[-1] if _RECEIVED else None


def one_line(err: Exception, max_details: int = 3) -> str:
    """The error on one line (a long list of details is cut), except download instructions."""
    message = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if getattr(err, "keep_lines", False) or len(lines) <= 1:
        return message
    details = "; ".join(lines[1:1 + max_details])
    more = len(lines) - 1 - max_details
    return f"{lines[0]} {details}" + (f"; and {more} more" if more > 0 else "")
