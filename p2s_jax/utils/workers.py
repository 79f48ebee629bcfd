"""Pools of workers for the host's work: threads of this process, or worker processes that
start clean (from a fork server, or spawned where there is none: nothing of JAX's threads is
forked) and never run the caller's main script again (what spawn and forkserver do to unpickle
functions defined there), so that a script which starts a run at its top level works as it
is. A worker process ignores Ctrl-C: the main process stops the run. Ctrl-C and SIGTERM wait
while a task is handed to a pool (which may start a worker): a pool interrupted halfway there
would keep a worker it no longer counts, and the process could not exit."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.context
import signal
import sys
from collections.abc import Sequence

from p2s_jax.utils.errors import signals_held

WORKER_KINDS = ("threads", "processes")


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _popen_without_main(process_class, process_obj):
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        return process_class._Popen(process_obj)
    finally:
        if path is not None:
            main.__file__ = path


if hasattr(multiprocessing.context, "ForkServerProcess"):  # not on Windows
    class _ForkServerWorker(multiprocessing.context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj):
            return _popen_without_main(multiprocessing.context.ForkServerProcess, process_obj)


class _SpawnWorker(multiprocessing.context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj):
        return _popen_without_main(multiprocessing.context.SpawnProcess, process_obj)


class _HeldSignalsWhileSubmitting:
    """A pool whose `submit` (`map` too) holds Ctrl-C and SIGTERM (module docstring)."""

    def submit(self, fn, /, *args, **kwargs):
        with signals_held():
            return super().submit(fn, *args, **kwargs)


class _Threads(_HeldSignalsWhileSubmitting, concurrent.futures.ThreadPoolExecutor):
    pass


class _Processes(_HeldSignalsWhileSubmitting, concurrent.futures.ProcessPoolExecutor):
    pass


def _process_context(preload: Sequence[str]):
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.context.ForkServerContext()
        context.set_forkserver_preload(list(preload))  # taken when the server first starts
        context.Process = _ForkServerWorker
    else:
        context = multiprocessing.context.SpawnContext()
        context.Process = _SpawnWorker
    return context


def worker_pool(kind: str, num_workers: int, preload: Sequence[str] = ()
                ) -> concurrent.futures.Executor:
    """`num_workers` threads, or worker processes (module docstring) whose fork server imports
    the modules `preload` (those of the functions they will run) once.

    Raises:
      ValueError: an unknown `kind`.
    """
    if kind not in WORKER_KINDS:
        raise ValueError(f"workers must be one of {WORKER_KINDS}, got {kind!r}")
    if kind == "threads":
        return _Threads(num_workers)
    return _Processes(num_workers, mp_context=_process_context(
        preload), initializer=_ignore_interrupts)
