"""Test hooks for `p2s train` in a subprocess (`--import train_hooks`), set by environment:

    P2S_TEST_SLOW_LOADER=SECONDS       each batch from step P2S_TEST_SLOW_FROM (0) on waits
                                       SECONDS first: a loader slower than the device
    P2S_TEST_SLOW_RECORDS=SECONDS      each record read waits SECONDS first, where the sample
                                       is made (the worker processes of data.loader=processes)
    P2S_TEST_MARK_STEP=K               the file P2S_TEST_MARK_FILE appears when the batch of
                                       step K is asked for (a signal can then land mid-run)
    P2S_TEST_HOLD_COMMIT_STEP=N        the asynchronous save of step N writes its files, then
                                       blocks before its commit (the rename), after creating
                                       P2S_TEST_MARK_FILE: SIGKILL lands mid-save


Everything else runs as `p2s train` runs it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from orbax.checkpoint._src.path import atomicity

import p2s_jax.train.inputs as inputs


def _mark() -> None:
    Path(os.environ["P2S_TEST_MARK_FILE"]).write_text("reached")


class SlowRecords:
    """A record source whose reads wait `delay` seconds first (picklable: grain's workers read
    through it)."""

    def __init__(self, source, delay: float):
        self.source, self.delay = source, delay

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        time.sleep(self.delay)
        return self.source[index]


class _Hooked:
    """The real loader, slowed and marked as the environment asks."""

    def __init__(self, loader):
        if "P2S_TEST_SLOW_RECORDS" in os.environ:
            loader.source = SlowRecords(loader.source, float(os.environ["P2S_TEST_SLOW_RECORDS"]))
        self.loader = loader
        self.num_records = loader.num_records
        self.delay = float(os.environ.get("P2S_TEST_SLOW_LOADER", "0"))
        self.slow_from = int(os.environ.get("P2S_TEST_SLOW_FROM", "0"))
        self.mark_step = int(os.environ.get("P2S_TEST_MARK_STEP", "-1"))

    def iterate(self, start: int = 0):
        for step, batch in self.loader.iterate(start):
            if step >= self.slow_from:
                time.sleep(self.delay)
            if step == self.mark_step:
                _mark()
            yield step, batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


_real_loader = inputs.training_loader
inputs.training_loader = lambda *args, **kwargs: _Hooked(_real_loader(*args, **kwargs))

if "P2S_TEST_HOLD_COMMIT_STEP" in os.environ:
    _hold = os.environ["P2S_TEST_HOLD_COMMIT_STEP"]
    _finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def _held_finalize(self):
        if Path(str(self._final_path)).name == _hold:
            _mark()
            while True:
                await asyncio.sleep(1)
        return await _finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = _held_finalize
