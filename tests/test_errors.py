"""`utils.errors`' signal handling: an interruption that lands where Python can only print it
(a garbage collector's callback) still stops the run, and a signal held over a block acts
once the block ends, through the handler it would have met."""

from __future__ import annotations

import gc
import signal
import time

import pytest

from p2s_jax.utils import errors


def _wait_for_interrupt(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.005)


def test_an_interrupt_raised_in_a_garbage_collector_callback_is_delivered_again():
    raised, finished = [], []

    def callback(phase, info):
        if phase == "start" and not raised:
            raised.append(True)
            signal.raise_signal(signal.SIGINT)
            finished.append(sum(range(1000)))  # the handler raises here, inside the callback

    gc.callbacks.append(callback)
    try:
        with errors.raise_on_signals(), pytest.raises(KeyboardInterrupt):
            gc.collect()  # Python prints the callback's KeyboardInterrupt and goes on
            _wait_for_interrupt(10.0)
    finally:
        gc.callbacks.remove(callback)
    assert raised and not finished  # it did land inside the callback first
    with errors.raise_on_signals():  # nothing is delivered twice
        _wait_for_interrupt(0.2)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_held_signal_acts_when_the_block_ends(number):
    expected = errors.Terminated if number == signal.SIGTERM else KeyboardInterrupt
    steps = []
    with errors.raise_on_signals(), pytest.raises(expected):
        with errors.signals_held():
            signal.raise_signal(number)
            steps.append("after the signal")
            _wait_for_interrupt(0.05)
            steps.append("end of the block")
        steps.append("after the block")
    assert steps == ["after the signal", "end of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
