"""The scheduler's responses, sent from their own thread: while one step's tokens go out (each a
response through Triton's sender), the scheduler already runs the next decode step. One queue keeps
every request's responses in order; a final response records the request's outcome."""
from __future__ import annotations

import queue
import threading
import time
from typing import Protocol

from .metrics import ServingMetrics


class Stream(Protocol):
    """Where one request's responses go (Triton's response sender in the server)."""

    def send(self, token: int, final: bool) -> None: ...

    def fail(self, message: str) -> None: ...  # a final error response

    def end(self) -> None: ...  # a final response with no token (the client has gone)

    def cancelled(self) -> bool: ...


SENDERS = 8  # threads handing responses to the server: each send waits for the server process's
# acknowledgement (a round trip of about 0.3 ms) with the GIL released, so sends to different
# requests overlap


class Responder:
    def __init__(self, metrics: ServingMetrics, senders: int = SENDERS):
        self.metrics = metrics
        self._queues = [queue.SimpleQueue() for _ in range(senders)]
        self._sender_of: dict[int, int] = {}  # id(stream) -> its thread, so its responses stay in order
        self._next = 0
        self._gone: set[int] = set()  # id() of streams a send to failed: their client has gone
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"generate-responder-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    def tokens(self, batch: list[tuple[Stream, int, str | None]]) -> None:
        """One step's tokens: (stream, token, outcome); an outcome marks the request's last token."""
        for index, part in self._split(batch).items():
            self._queues[index].put(("tokens", part))

    def fail(self, stream: Stream, message: str) -> None:
        self._queues[self._sender(stream, True)].put(("fail", [(stream, message, "failed")]))

    def end(self, stream: Stream) -> None:
        self._queues[self._sender(stream, True)].put(("end", [(stream, None, "cancelled")]))

    def gone(self, stream: Stream) -> bool:
        """True once a response to `stream` could not be delivered, or its client cancelled."""
        if id(stream) in self._gone:
            return True
        try:
            return bool(stream.cancelled())
        except Exception:
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued, then stop."""
        for q in self._queues:
            q.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def _sender(self, stream: Stream, last: bool) -> int:
        """The thread that sends `stream`'s responses (assigned in turn; forgotten after its last)."""
        key = id(stream)
        index = self._sender_of.get(key)
        if index is None:
            index = self._sender_of[key] = self._next
            self._next = (self._next + 1) % len(self._queues)
        if last:
            del self._sender_of[key]
        return index

    def _split(self, batch: list) -> dict[int, list]:
        parts: dict[int, list] = {}
        for entry in batch:
            parts.setdefault(self._sender(entry[0], entry[2] is not None), []).append(entry)
        return parts

    def _run(self, jobs: queue.SimpleQueue) -> None:
        while (item := jobs.get()) is not None:
            kind, batch = item
            started = time.perf_counter()
            for stream, value, outcome in batch:
                if kind == "tokens":
                    delivered = _quietly(stream.send, value, outcome is not None)
                elif kind == "fail":
                    delivered = _quietly(stream.fail, value)
                else:
                    delivered = _quietly(stream.end)
                if delivered is False:  # Triton refuses responses to a cancelled request
                    self._gone.add(id(stream))
                if outcome is not None:
                    self._gone.discard(id(stream))  # the request is over; its id may be reused
                    self.metrics.finished("cancelled" if delivered is False and kind == "tokens" else outcome)
            self.metrics.sent(time.perf_counter() - started)


def _quietly(call, *args):
    """Responses to a client that has gone may raise; that must not stop the server. False when it raised."""
    try:
        return call(*args)
    except Exception:
        return False
