"""The scheduler's counters: tokens generated, tokens/s over a sliding window, decode steps (rows
and time), active rows, queue length, open streams, time spent sending responses, finished requests
by outcome and whether the instance is being finalized. Updating them costs no I/O: a sink (Triton's
MetricFamily objects in the server, where each update is a message to the server process)
receives what changed every `publish_s` seconds from a thread of its own. `snapshot()` serves
tests and logs."""
from __future__ import annotations

import collections
import threading
import time
from typing import Protocol

OUTCOMES = ("completed", "cancelled", "rejected", "failed")
PUBLISH_S = 0.25
COUNTERS = ("tokens", "steps", "step_rows", "step_seconds", "admit_steps", "admit_step_seconds",
            "send_seconds")  # published as increments
GAUGES = ("tokens_per_second", "active_rows", "queue_length", "open_streams", "unloading")  # published as values


def prometheus_sums(text: str, names, model: str | None = None) -> dict[str, float]:
    """Each of `names` in Prometheus text (Triton's /metrics) summed over its labelled series, only
    `model`'s where given; ValueError for a value that is not a number."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        labels, _, value = rest.partition("} ")
        if name in names and (model is None or f'model="{model}"' in labels):
            try:
                sums[name] = sums.get(name, 0.0) + float(value.split()[0])
            except IndexError:
                raise ValueError(f"no value in the metrics line {line!r}") from None
    return sums


class MetricsSink(Protocol):
    def publish(self, name: str, value: float, outcome: str | None = None) -> None: ...


class ServingMetrics:
    def __init__(self, sink: MetricsSink | None = None, window_s: float = 5.0, publish_s: float = PUBLISH_S):
        self.sink, self.window_s = sink, window_s
        self.tokens_total, self.active, self.queued = 0, 0, 0
        self.open_streams = 0  # requests handed to this instance whose final response has not gone
        self.unloading = 0  # 1 once Triton has begun finalizing this instance
        self.steps, self.step_rows, self.step_seconds = 0, 0, 0.0  # decode steps: count, rows summed, time
        self.admit_steps, self.admit_step_seconds = 0, 0.0  # those that also admitted (prefilled) requests
        self.send_seconds = 0.0  # time the responder spent handing responses to the server
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()  # the publishing thread and begin_unloading() both publish
        self._published: dict = {}
        self._stop = threading.Event()
        self._thread = None
        if sink is not None:
            self._thread = threading.Thread(target=self._publish_every, args=(publish_s,), daemon=True,
                                            name="generate-metrics")
            self._thread.start()

    def tokens(self, count: int) -> None:
        with self._lock:
            self.tokens_total += count
            self._recent.append((time.monotonic(), count))

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated in the last window_s seconds, per second."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(count for _, count in self._recent) / self.window_s

    def step(self, rows: int, seconds: float, admitted: int = 0) -> None:
        """One decode step of `rows` rows took `seconds` of the decode loop, from the step before's
        return (decoder, sampling, the loop's work on the tokens; with the prefill of the `admitted`
        requests it started)."""
        with self._lock:
            self.steps += 1
            self.step_rows += rows
            self.step_seconds += seconds
            if admitted:
                self.admit_steps += 1
                self.admit_step_seconds += seconds

    def sent(self, seconds: float) -> None:
        with self._lock:
            self.send_seconds += seconds

    def rows(self, active: int, queued: int) -> None:
        self.active, self.queued = active, queued

    def stream_opened(self) -> None:
        with self._lock:
            self.open_streams += 1

    def stream_closed(self) -> None:
        """A request's final response went (or the request was completed without one)."""
        with self._lock:
            self.open_streams -= 1

    def begin_unloading(self) -> None:
        """Say at once that Triton is finalizing this instance (serve tells a model being unloaded
        from one that tritonserver holds by itself)."""
        self.unloading = 1
        try:
            self.publish()
        except Exception:  # a metrics failure must never stop serving (the publishing thread tries again)
            pass

    def finished(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def snapshot(self) -> dict:
        return {"tokens_total": self.tokens_total, "tokens_per_second": self.tokens_per_second(),
                "steps": self.steps, "step_rows": self.step_rows, "step_seconds": self.step_seconds,
                "admit_steps": self.admit_steps, "admit_step_seconds": self.admit_step_seconds,
                "send_seconds": self.send_seconds, "active_rows": self.active, "queue_length": self.queued,
                "open_streams": self.open_streams, "unloading": self.unloading, "requests": dict(self.requests)}

    def publish(self) -> None:
        """Hand the sink what changed since the last call: counters as increments, gauges as values."""
        if self.sink is None:
            return
        with self._publish_lock:
            self._publish()

    def _publish(self) -> None:
        with self._lock:
            totals = {"tokens": self.tokens_total, "steps": self.steps, "step_rows": self.step_rows,
                      "step_seconds": self.step_seconds, "admit_steps": self.admit_steps,
                      "admit_step_seconds": self.admit_step_seconds, "send_seconds": self.send_seconds,
                      **{("requests", outcome): count for outcome, count in self.requests.items()}}
        for key, total in totals.items():
            name, outcome = key if isinstance(key, tuple) else (key, None)
            if total != self._published.get(key, 0):
                self.sink.publish(name, total - self._published.get(key, 0), outcome)
                self._published[key] = total
        gauges = {"tokens_per_second": self.tokens_per_second(), "active_rows": self.active,
                  "queue_length": self.queued, "open_streams": self.open_streams, "unloading": self.unloading}
        for name, value in gauges.items():
            if value != self._published.get(name):
                self.sink.publish(name, value)
                self._published[name] = value

    def close(self) -> None:
        """Stop the publishing thread after a last publish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.publish()

    def _publish_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.publish()
            except Exception:  # a metrics failure must never stop serving
                pass
