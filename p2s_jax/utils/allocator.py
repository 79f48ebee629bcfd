"""Host memory allocator settings for CPU runs (glibc): reuse freed blocks instead of page-faulting.

XLA's CPU client allocates the temporaries of every call as one block (about 400 MB for the
t encoder at 1024, more for b+) on one of its worker threads and frees it when the call ends.
glibc serves such a block from a thread arena, which can only `mmap` it afresh: every call
then page-faults the whole block in again and the kernel zeroes it, 4 KiB at a time
(350,000 minor faults and ~0.45 s of a 5.2 s b+ encoder call on a 2-core x86-64 machine).
PyTorch's eager ops pay the same way for every intermediate above glibc's mmap threshold.

`keep_freed_memory()` makes every thread allocate from the main heap, never `mmap`, and never
return freed memory to the OS, so once the heap has grown to the peak (from the second call of
the encoder on) the blocks are reused without a single fault (b+ encoder: 5.2 -> 4.8 s; the
official predictor in the same process: 5.3 -> 4.5 s). The price: the process keeps its peak
memory until it exits.

Where it is applied (`choose_mode`): `p2s --malloc auto` (the default) keeps freed memory for
the long runs, `p2s evaluate` and `p2s train`, and says so on stderr; `--malloc kept` /
`--malloc default` force either for any command, and the environment variable
`P2S_MALLOC=kept|default` sets what `auto` means. The benchmarks take `--malloc` and apply it
to both sides.

It changes a process-wide setting, so it is only ever called explicitly, by an entry point,
as early as possible: arenas that threads created before the call keep their behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

DEFAULT_ENV = "P2S_MALLOC"  # "default": leave the allocator as it is


def keep_freed_memory() -> bool:
    """Sets glibc malloc to one arena, no mmap, no trimming; -> whether it was applied.

    False where the C library has no `mallopt` (macOS, musl) or refuses a setting; nothing
    else changes then.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


MODES = ("kept", "default")


def set_mode(mode: str) -> bool:
    """'kept': `keep_freed_memory()`; 'default': leave glibc as it is. -> whether it changed."""
    if mode not in MODES:
        raise ValueError(f"malloc mode must be one of {MODES}, got {mode!r}")
    return keep_freed_memory() if mode == "kept" else False


LONG_RUNS = ("evaluate", "train")


def choose_mode(requested: str, command: str, environ=None) -> str:
    """The mode for `p2s COMMAND --malloc REQUESTED`: 'auto' is `P2S_MALLOC` when set, else
    'kept' for the long runs (`LONG_RUNS`) and 'default' for the rest."""
    if requested != "auto":
        return requested
    environ = os.environ if environ is None else environ
    configured = environ.get(DEFAULT_ENV, "").strip().lower()
    if configured in MODES:
        return configured
    return "kept" if command in LONG_RUNS else "default"
