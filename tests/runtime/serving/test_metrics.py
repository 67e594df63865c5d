"""The scheduler's counters without a server: tokens/s over the sliding window, and what reaches a sink."""
from __future__ import annotations

import time

import pytest

from runtime.serving.metrics import ServingMetrics


class RecordingSink:
    def __init__(self):
        self.published: list[tuple[str, float, str | None]] = []

    def publish(self, name: str, value: float, outcome: str | None = None) -> None:
        self.published.append((name, value, outcome))


def test_tokens_per_second_is_the_tokens_of_the_last_window_over_its_length():
    metrics = ServingMetrics(window_s=5.0)
    assert metrics.tokens_per_second() == 0.0
    metrics.tokens(30)
    metrics.tokens(20)
    now = time.monotonic()
    assert metrics.tokens_per_second(now) == pytest.approx(50 / 5.0)
    assert metrics.snapshot()["tokens_per_second"] == pytest.approx(10.0)
    assert metrics.tokens_per_second(now + 4.0) == pytest.approx(10.0)  # still inside the window
    assert metrics.tokens_per_second(now + 6.0) == 0.0  # both fell out of it
    assert metrics.tokens_total == 50


def test_publish_hands_the_sink_counter_increments_and_the_tokens_per_second_gauge():
    sink = RecordingSink()
    metrics = ServingMetrics(sink, window_s=2.0, publish_s=3600)  # publish by hand only
    try:
        metrics.tokens(8)
        metrics.finished("completed")
        metrics.publish()
        first = {name if outcome is None else (name, outcome): value for name, value, outcome in sink.published}
        assert first["tokens"] == 8 and first[("requests", "completed")] == 1
        assert first["tokens_per_second"] == pytest.approx(8 / 2.0)
        sink.published.clear()
        metrics.tokens(4)
        metrics.publish()
        second = {name: value for name, value, _ in sink.published}
        assert second["tokens"] == 4 and second["tokens_per_second"] == pytest.approx(12 / 2.0)
    finally:
        metrics.close()


def test_steps_that_admitted_requests_are_counted_apart_too():
    sink = RecordingSink()
    metrics = ServingMetrics(sink, publish_s=3600)
    try:
        metrics.step(32, 0.001)
        metrics.step(31, 0.002, admitted=2)
        metrics.step(32, 0.001, admitted=0)
        metrics.publish()
        published = {name: value for name, value, _ in sink.published}
        assert published["steps"] == 3 and published["step_rows"] == 95
        assert published["step_seconds"] == pytest.approx(0.004)
        assert published["admit_steps"] == 1 and published["admit_step_seconds"] == pytest.approx(0.002)
        snapshot = metrics.snapshot()
        assert (snapshot["admit_steps"], snapshot["admit_step_seconds"]) == (1, pytest.approx(0.002))
    finally:
        metrics.close()


def test_the_unloading_gauge_is_published_as_0_and_as_1_at_once_when_unloading_begins():
    sink = RecordingSink()
    metrics = ServingMetrics(sink, publish_s=3600)  # publish by hand only
    try:
        metrics.publish()
        assert ("unloading", 0, None) in sink.published
        sink.published.clear()
        metrics.begin_unloading()  # no publish() by hand: serve reads it while the instance drains
        assert ("unloading", 1, None) in sink.published and metrics.snapshot()["unloading"] == 1
    finally:
        metrics.close()


def test_a_served_step_is_timed_from_the_step_befores_return():
    """The loop's own work between steps counts (the overlapped engine's step() returns once the step
    before is done, so its own duration reads short); a step after the engine went idle counts from
    its own start, not across the wait for work."""
    from runtime.serving import decode_loop

    clock_times = iter([10.0, 10.001, 10.003, 10.004, 20.0, 20.002])  # start / return of three steps

    class Engine:
        idle_after = [False, True, False]

        def step(self):
            self.idle = self.idle_after.pop(0)
            return []

    clock, engine = decode_loop._StepClock(lambda: next(clock_times)), Engine()
    seconds = [clock.step(engine)[1] for _ in range(3)]
    assert seconds == pytest.approx([0.001, 0.003, 0.002])  # the second from the first's return; the third alone
