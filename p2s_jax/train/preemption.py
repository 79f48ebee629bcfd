"""Stopping a training run cleanly when it is told to: a TPU VM's preemption or maintenance
notice (SIGTERM, about 30 s ahead), or Ctrl-C.

`StopWatch.should_stop(step)` is asked after every dispatched step, with the same step on every
process. On a multi-process run (`jax.distributed` initialised) JAX's preemption sync point answers
(`multihost_utils.reached_preemption_sync_point`): the coordination service catches SIGTERM on
any host and every host gets True at the same step, so that all save that step. On a single
process SIGTERM sets a flag instead. The first Ctrl-C asks for the same clean stop (the second
interrupts at once). The loop then saves the step reached, waits for the save to commit and
raises `Preempted`: `p2s train` prints one line and exits with `PREEMPTED_EXIT_STATUS`.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

from p2s_jax.utils.errors import Stopped, raise_interrupt

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry": resume.
PREEMPTED_EXIT_STATUS = 75


class Preempted(Stopped):
    """The run stopped at a checkpoint because it was told to (SIGTERM, Ctrl-C)."""

    exit_status = PREEMPTED_EXIT_STATUS

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class StopWatch:
    """Whether the run was asked to stop (see the module docstring); a context manager that
    installs the signal handlers of a single process and restores the previous ones."""

    def __init__(self):
        self._requested = threading.Event()
        self._reason = ""
        self._distributed = False
        self._previous: dict = {}

    def __enter__(self) -> "StopWatch":
        self._distributed = _jax_watches_sigterm()
        if self._distributed or threading.current_thread() is not threading.main_thread():
            return self  # JAX's preemption notifier keeps SIGTERM; Ctrl-C stays as it is
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _on_term(self, signum, frame) -> None:
        self._request("SIGTERM (preemption or maintenance notice)")

    def _on_interrupt(self, signum, frame) -> None:
        if self._requested.is_set():
            raise_interrupt(signum)
        self._request("Ctrl-C")

    def _request(self, reason: str) -> None:
        self._reason = reason
        self._requested.set()

    @property
    def reason(self) -> str:
        return self._reason or "SIGTERM (preemption or maintenance notice)"

    def should_stop(self, step: int) -> bool:
        """Whether to stop after `step` (every process must ask with the same steps)."""
        if self._distributed:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._requested.is_set()


def _jax_watches_sigterm() -> bool:
    """Whether JAX's coordination service catches SIGTERM here: a multi-process run
    (`jax.distributed`, whose preemption notifier keeps the signal and makes the hosts agree on
    a step)."""
    return jax.process_count() > 1
