"""The scheduler's counters: tokens generated, tokens/s over a sliding window, active rows, queue
length and finished requests by outcome. A sink (Triton's MetricFamily objects in the server)
receives every change; `snapshot()` serves tests and logs."""
from __future__ import annotations

import collections
import threading
import time
from typing import Protocol

OUTCOMES = ("completed", "cancelled", "rejected", "failed")


class MetricsSink(Protocol):
    def publish(self, name: str, value: float, outcome: str | None = None) -> None: ...


class ServingMetrics:
    def __init__(self, sink: MetricsSink | None = None, window_s: float = 5.0):
        self.sink, self.window_s = sink, window_s
        self.tokens_total, self.active, self.queued = 0, 0, 0
        self.steps, self.step_rows, self.step_seconds = 0, 0, 0.0  # decode steps: count, rows summed, time
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def tokens(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens_total += count
            self._recent.append((now, count))
        self._publish("tokens", count)
        self._publish("tokens_per_second", self.tokens_per_second(now))

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated in the last window_s seconds, per second."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(count for _, count in self._recent) / self.window_s

    def step(self, rows: int, seconds: float) -> None:
        """One decode step of `rows` rows took `seconds` (decoder, sampling and queuing the tokens)."""
        with self._lock:
            self.steps += 1
            self.step_rows += rows
            self.step_seconds += seconds
        self._publish("steps", 1)
        self._publish("step_rows", rows)
        self._publish("step_seconds", seconds)

    def rows(self, active: int, queued: int) -> None:
        self.active, self.queued = active, queued
        self._publish("active_rows", active)
        self._publish("queue_length", queued)
        self._publish("tokens_per_second", self.tokens_per_second())  # decays to 0 while idle

    def finished(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1
        self._publish("requests", 1, outcome)

    def snapshot(self) -> dict:
        return {"tokens_total": self.tokens_total, "tokens_per_second": self.tokens_per_second(),
                "steps": self.steps, "step_rows": self.step_rows, "step_seconds": self.step_seconds,
                "active_rows": self.active, "queue_length": self.queued, "requests": dict(self.requests)}

    def _publish(self, name: str, value: float, outcome: str | None = None) -> None:
        if self.sink is not None:
            self.sink.publish(name, value, outcome)
