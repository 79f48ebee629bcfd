"""The step timer (`train.timing.StepTimer`) against the true ends of fake device steps: the
time split of each step, and steps whose ends the watcher sees late."""

from __future__ import annotations

import time

import pytest

from p2s_jax.train.timing import StepTimer


class FakeStep:
    """A step's outputs: done at `ends_at` (perf_counter); `block_until_ready` returns only at
    `seen_at` (a watcher held up, as by another thread holding the interpreter lock)."""

    def __init__(self, ends_at: float, seen_at: float | None = None):
        self.ends_at, self.seen_at = ends_at, max(ends_at, seen_at or ends_at)

    def is_ready(self) -> bool:
        return time.perf_counter() >= self.ends_at

    def block_until_ready(self):
        time.sleep(max(0.0, self.seen_at - time.perf_counter()))
        return self


def _run(steps: list[tuple[float, float, float | None]]) -> list:
    """Dispatches fake steps (dispatch offset, end offset, seen offset), in seconds from now;
    -> the timer's times of each."""
    timer = StepTimer(4, 1.0, None, 1)
    t0 = time.perf_counter()
    try:
        for index, (dispatch, end, seen) in enumerate(steps):
            time.sleep(max(0.0, t0 + dispatch - time.perf_counter()))
            timer.dispatched(index, 0.0, 0.0, FakeStep(t0 + end, seen and t0 + seen),
                             t0 + dispatch)
        return [timer.times(index, timeout=10) for index in range(len(steps))]
    finally:
        timer.close()


def test_each_step_gets_its_own_time():
    """Steps of 0.2 s dispatched ahead (the device always busy), then one after a pause."""
    times = _run([(0.0, 0.2, None), (0.05, 0.4, None), (0.1, 0.6, None), (0.9, 1.1, None)])
    for t in times[:3]:
        assert t.wall == pytest.approx(0.2, abs=0.03) and t.idle == pytest.approx(0, abs=0.01)
    assert times[3].idle == pytest.approx(0.3, abs=0.03)
    assert times[3].device == pytest.approx(0.2, abs=0.03)
    assert times[3].wall == pytest.approx(0.5, abs=0.03)
    assert sum(t.wall for t in times) == pytest.approx(1.1, abs=0.03)


def test_a_watcher_held_up_past_the_next_step_shares_the_time():
    """Step 1 ends at 0.4 but the watcher sees it only at 0.65, when step 2 (0.6) is done too:
    the two steps share the 0.4 s from 0.2 to 0.6+ instead of 0.45 s and nothing."""
    times = _run([(0.0, 0.2, None), (0.05, 0.4, 0.65), (0.1, 0.6, None), (0.15, 0.8, None)])
    assert times[0].wall == pytest.approx(0.2, abs=0.03)
    assert times[1].wall == pytest.approx(times[2].wall, abs=1e-9)
    assert times[1].wall == pytest.approx(0.225, abs=0.03)  # (0.65 - 0.2) / 2
    assert times[3].wall == pytest.approx(0.15, abs=0.03)  # 0.8 - 0.65
    assert min(t.wall for t in times) > 0.1
    assert sum(t.wall for t in times) == pytest.approx(0.8, abs=0.03)
