"""Where a training step's time goes, and how much of the chip it uses.

Per step the host measures (`StepTimer`): the wait for the loader's batch, the host -> device
transfer of that batch (`host_to_global` until the arrays are on the devices), and the device
step: from its dispatch (or the end of the previous step, when the device was still busy) until
its outputs are ready, seen by a watcher thread that blocks on them. The step's wall time is the
time between the ends of two consecutive steps (images/s is the global batch over it): the
device step plus the time the device sat idle before it (`time_device_idle_s`), waiting for the
host. Loading overlaps the previous step's device work, so the loader's wait shows in the wall
time only where it outlasts that work. With the device's dense bf16 peak known
(`p2s_jax.hardware`), model-FLOPs utilisation (MFU: the architecture's own FLOPs,
`model.flops.train_flops_per_image`) and hardware-FLOPs
utilisation (HFU: XLA's count of the compiled step) are reported too.

The watcher needs the interpreter lock to note the time a step ended; while other threads hold
it (an asynchronous checkpoint save's) it can be held up past the end of the next step too.
Steps whose ends it sees together (the later ones already done when it notes the first) share
their device time evenly, so that no step is reported as taking no time after one that took
both their times.

A run whose device waits on its input says so: over each window of steps, the share of the wall
time the device sat idle waiting for a batch (`data_bound_share`).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time

import jax


@dataclasses.dataclass
class StepTimes:
    """The times of one step, seconds."""

    loader: float = 0.0  # waiting for the loader's batch
    transfer: float = 0.0  # host -> device
    device: float = 0.0  # the device computing the step
    wall: float = 0.0  # end of the previous step -> end of this one
    idle: float = 0.0  # the device idle before this step, waiting for its input


class StepTimer:
    """Measures each step (see the module docstring).

    Args:
      images_per_step: the global batch.
      model_flops_per_image: the architecture's FLOPs of one training image (all devices).
      peak_flops: the dense bf16 FLOP/s of one device, or None when unknown (no MFU / HFU).
      num_devices: devices of the run.
      window: steps over which `data_bound_share` is taken.
    """

    def __init__(self, images_per_step: int, model_flops_per_image: float,
                 peak_flops: float | None, num_devices: int, window: int = 100):
        self.images_per_step = images_per_step
        self.model_flops_per_image = model_flops_per_image
        self.peak_flops, self.num_devices = peak_flops, num_devices
        self.hardware_flops_per_step: float | None = None  # XLA's, all devices
        self.window: collections.deque = collections.deque(maxlen=window)
        self._times: dict[int, StepTimes] = {}
        self._dispatched: dict[int, float] = {}
        self._done: set[int] = set()  # steps whose end the watcher has seen
        self._last_done: float | None = None
        self._lock = threading.Condition()  # notified when a step's end is seen
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._watch, name="p2s-step-timer", daemon=True)
        self._thread.start()

    def restart(self) -> None:
        """Forgets the end of the previous step (after an evaluation or a pause), so that the
        next step's wall time does not include it."""
        with self._lock:
            self._last_done = None

    def dispatched(self, step: int, loader_s: float, transfer_s: float, outputs,
                   dispatch: float) -> None:
        """Step `step` was dispatched at `dispatch` (`time.perf_counter()` before the call),
        its batch having taken `loader_s` and `transfer_s`; `outputs` are its device arrays
        (the watcher blocks on them)."""
        with self._lock:
            self._times[step] = StepTimes(loader=loader_s, transfer=transfer_s)
            self._dispatched[step] = dispatch
        self._queue.put((step, outputs))

    def _watch(self) -> None:
        waiting = None  # a step taken from the queue that was not done yet
        while True:
            step, outputs = waiting if waiting is not None else self._queue.get()
            waiting = None
            if step is None:
                return
            jax.block_until_ready(outputs)
            done = time.perf_counter()
            steps = [step]
            while waiting is None:  # the steps that ended before the watcher saw this one end
                try:
                    later = self._queue.get_nowait()
                except queue.Empty:
                    break
                if later[0] is not None and _is_ready(later[1]):
                    steps.append(later[0])
                else:
                    waiting = later
            self._ended(steps, done)

    def _ended(self, steps: list[int], done: float) -> None:
        """Records the end of `steps` (consecutive, seen together) at `done`."""
        with self._lock:
            first = self._times[steps[0]]
            start = self._dispatched[steps[0]]
            previous = self._last_done
            if previous is None:
                previous = start - first.loader - first.transfer
            device = (done - max(start, previous)) / len(steps)
            for index, step in enumerate(steps):
                times = self._times[step]
                self._dispatched.pop(step)
                times.idle = max(0.0, start - previous) if index == 0 else 0.0
                times.device = device
                times.wall = times.idle + device
                self._done.add(step)
            self._last_done = done
            self._lock.notify_all()

    def times(self, step: int, timeout: float = 600.0) -> StepTimes:
        """The measured times of `step` (waits for its end to be seen)."""
        with self._lock:
            if not self._lock.wait_for(lambda: step in self._done, timeout):
                raise TimeoutError(f"step {step} did not finish within {timeout} s")
            self._done.remove(step)
            times = self._times.pop(step)
        self.window.append(times)
        return times

    def metrics(self, times: StepTimes) -> dict[str, float]:
        """The step's time split, images/s and utilisations, for the metrics log."""
        wall = max(times.wall, 1e-9)
        out = {"images_per_second": self.images_per_step / wall, "time_step_s": times.wall,
               "time_loader_s": times.loader, "time_transfer_s": times.transfer,
               "time_device_s": times.device, "time_device_idle_s": times.idle}
        if self.peak_flops:
            peak = self.peak_flops * self.num_devices
            out["mfu"] = self.images_per_step * self.model_flops_per_image / wall / peak
            if self.hardware_flops_per_step:
                out["hfu"] = self.hardware_flops_per_step / wall / peak
        return out

    def data_bound_share(self) -> float:
        """The share of the window's wall time the device waited for its input."""
        wall = sum(t.wall for t in self.window)
        return sum(min(t.idle, t.loader + t.transfer) for t in self.window) / wall if wall else 0.0

    def close(self) -> None:
        self._queue.put((None, None))
        self._thread.join(timeout=5)


def _is_ready(outputs) -> bool:
    """Whether every array of `outputs` is computed (without waiting)."""
    return all(leaf.is_ready() for leaf in jax.tree.leaves(outputs) if hasattr(leaf, "is_ready"))
