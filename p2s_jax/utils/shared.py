"""Arrays that worker processes read and write in place: a file in shared memory (`/dev/shm`
where the system has it, else the temporary folder), mapped by every process that opens it by
path. Nothing goes through a pipe, and no process copies an array to hand it on.

The process that makes a `SharedArray` owns its file and removes it (`close`, or leaving the
`with` block); workers `open_shared` it from its `spec` while it exists.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

_SHM = Path("/dev/shm")


class SharedSpec(NamedTuple):
    """What a worker needs to open a `SharedArray`: its file, shape and dtype (picklable)."""

    path: str
    shape: tuple
    dtype: str


class SharedArray:
    """A zero-filled array of `shape` and `dtype` in a shared-memory file (module docstring),
    a new one of its own, or at `path`.

    Attributes:
      array: the array, mapped in this process.
      spec: how another process opens it (`open_shared`).
    """

    def __init__(self, shape, dtype, path: str | None = None):
        if path is None:
            folder = _SHM if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
            handle, path = tempfile.mkstemp(prefix="p2s-", suffix=".array", dir=folder)
        else:  # a name of the caller's, beside another shared array
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        try:
            os.ftruncate(handle, max(1, int(np.prod(shape)) * dtype.itemsize))
        finally:
            os.close(handle)
        self.spec = SharedSpec(path, shape, dtype.str)
        self.array = open_shared(self.spec)

    def close(self) -> None:
        """Unmaps the array here and removes the file (idempotent; workers' maps stay valid
        until they close them)."""
        self.array = None
        Path(self.spec.path).unlink(missing_ok=True)

    def __enter__(self) -> "SharedArray":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shared(spec: SharedSpec) -> np.ndarray:
    """The array of `spec`, mapped in this process (reads and writes go to the shared file)."""
    if not spec.shape or int(np.prod(spec.shape)) == 0:
        return np.zeros(spec.shape, spec.dtype)
    return np.memmap(spec.path, dtype=spec.dtype, mode="r+", shape=spec.shape)
