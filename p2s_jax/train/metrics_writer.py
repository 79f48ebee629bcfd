"""Training metrics to a JSONL file and TensorBoard event files (no TensorFlow needed).

TensorBoard events are written with the ``tensorboard`` package's own ``EventFileWriter`` and
protos (what ``torch.utils.tensorboard`` does); without the package only the JSONL is written.
Only process 0 of a multi-host run writes. A run resumed from step s abandons what was logged
after s (the steps it runs again): the JSONL keeps records up to s and moves the later ones to
``metrics.abandoned.jsonl``; TensorBoard is told with its own convention, a
``SessionLog(START)`` event at step s + 1, after which its readers discard the older events
from step s + 1 on. The JSONL file is appended to, which object stores
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

from p2s_jax.utils.files import write_atomic


class MetricsWriter:
    """``write(step, {name: float})`` -> ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard``.

    ``resumed_from``: the step a resumed run starts from (records after it are abandoned, see
    the module docstring); None for a new run."""

    def __init__(self, workdir: str | Path | epath.Path, enabled: bool = True,
                 resumed_from: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._events = None
        if not enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if resumed_from is not None:
            _abandon_after(workdir, resumed_from)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            return
        self._events = EventFileWriter(str(workdir / "tensorboard"))
        if resumed_from is not None:
            from tensorboard.compat.proto import event_pb2

            self._events.add_event(event_pb2.Event(
                step=resumed_from + 1, wall_time=time.time(),
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

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


def _abandon_after(workdir: epath.Path, step: int) -> None:
    """Moves the records of `metrics.jsonl` after `step` to `metrics.abandoned.jsonl`."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    with (workdir / "metrics.abandoned.jsonl").open("a") as f:
        f.writelines(line + "\n" for line in lines if json.loads(line)["step"] > step)
    write_atomic(path, "".join(line + "\n" for line in kept))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

