"""The scheduler's responses, sent from their own thread: while one step's tokens go out (each a
response through Triton's sender), the scheduler already runs the next decode step. One queue keeps
every request's responses in order; a final response records the request's outcome."""
from __future__ import annotations

import queue
import threading
from typing import Protocol

from .metrics import ServingMetrics


class Stream(Protocol):
    """Where one request's responses go (Triton's response sender in the server)."""

    def send(self, token: int, final: bool) -> None: ...

    def fail(self, message: str) -> None: ...  # a final error response

    def end(self) -> None: ...  # a final response with no token (the client has gone)

    def cancelled(self) -> bool: ...


class Responder:
    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._gone: set[int] = set()  # id() of streams a send to failed: their client has gone
        self._thread = threading.Thread(target=self._run, name="generate-responder", daemon=True)
        self._thread.start()

    def tokens(self, batch: list[tuple[Stream, int, str | None]]) -> None:
        """One step's tokens: (stream, token, outcome); an outcome marks the request's last token."""
        self._queue.put(("tokens", batch))

    def fail(self, stream: Stream, message: str) -> None:
        self._queue.put(("fail", [(stream, message, "failed")]))

    def end(self, stream: Stream) -> None:
        self._queue.put(("end", [(stream, None, "cancelled")]))

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
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, batch = item
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


def _quietly(call, *args):
    """Responses to a client that has gone may raise; that must not stop the server. False when it raised."""
    try:
        return call(*args)
    except Exception:
        return False
