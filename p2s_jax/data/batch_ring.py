"""Whole training batches handed from grain's worker processes to the training process without
a copy and without a page of memory made or freed per batch: a ring of batch slots in one
shared-memory file (`utils.shared`), reused.

A worker making the batch of step s writes it straight into slot s % R (R slots) when that slot
is free for step s, and hands back only the slot number; the training process maps the slot and
gives the batch out as arrays over that map. When every array of a batch is gone (the training
step has put it on the devices and let go of it), the slot is marked free for step s + R. A
slot still held when its next step comes (a caller keeping many batches) is not waited for: that
batch goes to a file of its own beside the ring's, which the training process maps and removes
(and `close` removes those never received). So the
contract of a batch is that of any array: it stays valid as long as it is referenced.

Each slot holds the batch's arrays one after another, each at a 64-byte boundary, in the order
of `loader.sample_layout`; a slot's size is a whole number of pages (a map starts at a page).
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from p2s_jax.utils.shared import SharedArray, SharedSpec, open_shared

_ALIGN = 64


class RingSpec(NamedTuple):
    """What a worker needs to write into the ring (picklable)."""

    data: SharedSpec  # (R, slot bytes) uint8
    free_for: SharedSpec  # (R,) int64: the step each slot may take next
    layout: tuple  # ((key, offset, shape, dtype str), ...) within a slot
    slot_bytes: int


def batch_layout(sample_layout: Mapping[str, tuple], batch_size: int) -> tuple[tuple, int]:
    """((key, offset, shape, dtype), ...) of a batch of `batch_size` samples of
    `sample_layout` (key -> (shape, dtype)) in one slot, and the slot's bytes (whole pages)."""
    layout, offset = [], 0
    for key, (shape, dtype) in sample_layout.items():
        shape = (batch_size, *shape)
        layout.append((key, offset, shape, np.dtype(dtype).str))
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    page = mmap.ALLOCATIONGRANULARITY
    return tuple(layout), max(page, -(-offset // page) * page)


def _arrays(buffer, layout: Sequence[tuple]) -> dict[str, np.ndarray]:
    """The batch's arrays over `buffer` (a slot's bytes)."""
    return {key: np.frombuffer(buffer, np.dtype(dtype), int(np.prod(shape)), offset)
            .reshape(shape) for key, offset, shape, dtype in layout}


class BatchRing:
    """The ring of one `TrainLoader.iterate` (module docstring): `slots` slots for batches of
    `layout` starting at `start_step`. The process that makes it owns the files (`close`)."""

    def __init__(self, layout: tuple, slot_bytes: int, slots: int, start_step: int):
        self.data = SharedArray((slots, slot_bytes), np.uint8)
        self.free_for = SharedArray((slots,), np.int64)
        for step in range(start_step, start_step + slots):
            self.free_for.array[step % slots] = step
        self.spec = RingSpec(self.data.spec, self.free_for.spec, layout, slot_bytes)
        self._file = os.open(self.data.spec.path, os.O_RDWR)

    def receive(self, handed: Mapping) -> dict[str, np.ndarray]:
        """The batch a worker handed over (`write_batch`'s answer) as arrays; the slot is freed
        for its next step once they are all gone."""
        if "path" in handed:  # a batch of its own file: mapped, and the file removed
            with open(handed["path"], "r+b") as f:
                view = mmap.mmap(f.fileno(), self.spec.slot_bytes)
            os.unlink(handed["path"])
            return _arrays(view, self.spec.layout)
        slot, step = int(handed["slot"]), int(handed["step"])
        view = mmap.mmap(self._file, self.spec.slot_bytes, offset=slot * self.spec.slot_bytes)
        free_for = self.free_for.array
        weakref.finalize(view, free_for.__setitem__, slot, step + len(free_for))
        return _arrays(view, self.spec.layout)

    def close(self) -> None:
        """Removes the files, those of batches made but never received too (batches given
        out stay valid while referenced)."""
        os.close(self._file)
        path = Path(self.data.spec.path)
        for own in path.parent.glob(path.name + ".step*"):
            own.unlink(missing_ok=True)
        self.data.close()
        self.free_for.close()


def write_batch(ring: RingSpec, step: int, samples: Sequence[Mapping[str, np.ndarray]]
                ) -> dict:
    """A worker's side: the samples of step `step` stacked into its slot when the slot is free
    for it, else into a file of their own -> what the training process needs to find them."""
    free_for = open_shared(ring.free_for)
    slot = step % len(free_for)
    if int(free_for[slot]) == step:
        buffer = open_shared(ring.data)[slot]
        handed = {"slot": slot, "step": step}
    else:
        own = SharedArray((ring.slot_bytes,), np.uint8, path=f"{ring.data.path}.step{step}")
        buffer, handed = own.array, {"path": own.spec.path, "step": step}
    arrays = _arrays(buffer, ring.layout)
    for row, sample in enumerate(samples):
        for key, array in arrays.items():
            array[row] = sample[key]
    return handed
