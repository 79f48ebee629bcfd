"""Training metrics to a JSONL file and TensorBoard event files (no TensorFlow needed).

TensorBoard events are written with the ``tensorboard`` package's own ``EventFileWriter`` and
protos (what ``torch.utils.tensorboard`` does); without the package only the JSONL is written.
Only process 0 of a multi-host run writes. The JSONL file is appended to, which object stores
(``gs://``) do not offer: a workdir there keeps its metrics on a filesystem that appends (a
gcsfuse mount), docs/tpu-pod.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping

from etils import epath


class MetricsWriter:
    """``write(step, {name: float})`` -> ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard``."""

    def __init__(self, workdir: str | Path | epath.Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._events = None
        if not enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            return
        self._events = EventFileWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        record = {"step": int(step), "time": time.time(),
                  **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(value=[
                summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()])
            self._events.add_event(event_pb2.Event(summary=summary, step=int(step),
                                                   wall_time=time.time()))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

