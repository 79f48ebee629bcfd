"""Several JAX processes on this machine, as on a multi-host cluster (jax.distributed with a local
coordinator and gloo CPU collectives), for the multi-host tests.

The parent picks `process_env(n)`, one environment per child; each child calls `initialize()`
first, which does nothing outside such a child.
"""

from __future__ import annotations

import os
import socket


def process_env(num_processes: int) -> list[dict]:
    """Extra environment variables of each of `num_processes` children (a free local port)."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    return [{"P2S_TEST_PROCESS": str(i), "P2S_TEST_PROCESSES": str(num_processes),
             "P2S_TEST_COORDINATOR": f"localhost:{port}"} for i in range(num_processes)]


def initialize() -> None:
    """`jax.distributed.initialize` from `process_env`'s variables, if this is such a child."""
    if "P2S_TEST_PROCESS" not in os.environ:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["P2S_TEST_COORDINATOR"],
                               num_processes=int(os.environ["P2S_TEST_PROCESSES"]),
                               process_id=int(os.environ["P2S_TEST_PROCESS"]))
