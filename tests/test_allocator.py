"""`p2s_jax.utils.allocator`: with it, a call's large buffers are reused (no page faults once the
heap has grown to the peak); without it, glibc maps them afresh and every call faults them in again.

Each case runs in its own process: the setting is process-wide and must come first.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys, time
from p2s_jax.utils import allocator
applied = allocator.keep_freed_memory() if sys.argv[1] == "tuned" else False
import jax, jax.numpy as jnp
# 64 MiB output and temporaries: above glibc's largest mmap threshold (32 MiB).
f = jax.jit(lambda x: jnp.sin(x) * jnp.cos(x[::-1]) + x.T)
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del y
    time.sleep(0.5)  # jax frees the output on a worker thread (later on a busy machine)
print(json.dumps({"applied": applied, "faults": faults}))
"""

PAGES_64_MIB = 64 * 2**20 // 4096


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True,
                         text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_keep_freed_memory_removes_the_page_faults_of_repeated_calls():
    default, tuned = run("default"), run("tuned")
    assert tuned["applied"] is True
    # glibc's default: every call maps its 64 MiB blocks again and faults every page in.
    assert min(default["faults"][1:]) > PAGES_64_MIB // 2, default
    # kept memory: once the heap has grown to the peak, calls reuse its blocks.
    assert max(tuned["faults"][-3:]) < PAGES_64_MIB // 50, tuned


def test_cli_choice_of_mode():
    from p2s_jax.utils import allocator
    env = {allocator.DEFAULT_ENV: "default"}
    assert allocator.choose_mode("auto", "evaluate", env) == "default"
    assert allocator.choose_mode("auto", "evaluate", {}) == "kept"
    assert allocator.choose_mode("auto", "train", {}) == "kept"
    assert allocator.choose_mode("auto", "segment", {}) == "default"
    assert allocator.choose_mode("auto", "segment", {allocator.DEFAULT_ENV: "kept"}) == "kept"
    assert allocator.choose_mode("kept", "convert", env) == "kept"
    assert allocator.choose_mode("default", "train", {}) == "default"
