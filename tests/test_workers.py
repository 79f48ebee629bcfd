"""`utils.workers`: worker processes never run the caller's main script again (a script that
starts a run at its top level, unguarded), both kinds run the same work, and Ctrl-C while a
worker starts leaves a pool that stops."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from p2s_jax.utils import workers
from p2s_jax.utils.errors import raise_on_signals
from p2s_jax.utils.workers import worker_pool

REPO = Path(__file__).resolve().parents[1]


def test_an_unguarded_script_runs_once_with_worker_processes(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import math\n"
        "from p2s_jax.utils.workers import worker_pool\n"
        "print('top level', flush=True)\n"
        "pool = worker_pool('processes', 2)\n"
        "print(sorted(pool.map(math.factorial, range(6))), flush=True)\n"
        "pool.shutdown()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=REPO, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["top level", "[1, 1, 2, 6, 24, 120]"]


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_both_kinds_run_the_work(kind):
    import math

    with worker_pool(kind, 2) as pool:
        assert list(pool.map(math.comb, [5, 6, 7], [2, 3, 3])) == [10, 20, 35]
    with pytest.raises(ValueError, match="one of"):
        worker_pool("fibers", 2)


@pytest.mark.skipif(not hasattr(workers, "_ForkServerWorker"), reason="no fork server here")
def test_ctrl_c_while_a_worker_starts_leaves_a_pool_that_stops(monkeypatch):
    """Ctrl-C that lands just after a worker process started, before the pool has counted it
    (the moment `submit` starts a worker): the interruption still reaches the caller, and
    the pool then stops with every worker it started; a pool that lost count of one would
    keep it waiting for work forever, and the process could not exit."""
    import math
    import multiprocessing

    start, started = workers._ForkServerWorker.start, []

    def start_then_ctrl_c(process):
        start(process)
        started.append(process.pid)
        signal.raise_signal(signal.SIGINT)
        sum(range(1000))  # the handler runs here unless the signal is held

    monkeypatch.setattr(workers._ForkServerWorker, "start", start_then_ctrl_c)
    pool = worker_pool("processes", 1)
    try:
        with raise_on_signals(), pytest.raises(KeyboardInterrupt):
            pool.submit(math.factorial, 5)
        assert list(pool._processes) == started  # the pool counts the worker it started
        monkeypatch.undo()
        assert pool.submit(math.factorial, 6).result(timeout=60) == 720
        stopping = threading.Thread(target=pool.shutdown, daemon=True)
        stopping.start()
        stopping.join(30)
        assert not stopping.is_alive(), "the pool did not stop within 30 s"
        end = time.monotonic() + 30
        while multiprocessing.active_children() and time.monotonic() < end:
            time.sleep(0.05)
        assert multiprocessing.active_children() == []
    finally:  # a worker left behind would hold this process at its exit
        for child in multiprocessing.active_children():
            child.kill()
