"""`utils.workers`: worker processes never run the caller's main script again (a script that
starts a run at its top level, unguarded), and both kinds run the same work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
