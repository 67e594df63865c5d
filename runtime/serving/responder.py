"""Responses, sent from threads of their own so the decode loop never waits on a client.

The decode thread only appends each token to its stream's outbox. A stream whose outbox was empty
is handed to a sender thread, which sends everything the outbox holds by then in one response:
when the senders keep up, every token goes out on its own at once; when they fall behind (each
python-backend send is a round trip to the server process), a stream's pending tokens travel
together in its next response. No timers. A stream is with at most one sender at a time, so its
responses stay in order, and its last token travels in its final response.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Protocol

from .metrics import ServingMetrics


class Stream(Protocol):
    """Where one request's responses go (Triton's response sender in the server)."""

    def send(self, tokens: list[int], final: bool) -> None: ...  # one response with one or more tokens

    def fail(self, message: str) -> None: ...  # a final error response

    def end(self) -> None: ...  # a final response with no token (the client has gone)

    def cancelled(self) -> bool: ...


SENDERS = 4  # threads handing responses to the server: each send waits for the server process's
# acknowledgement with the GIL released, so sends to different requests overlap


class _Outbox:
    __slots__ = ("stream", "tokens", "outcome", "error", "busy")

    def __init__(self, stream: Stream):
        self.stream = stream
        self.tokens: list[int] = []
        self.outcome: str | None = None  # set with the request's last news: it ends the stream
        self.error: str | None = None
        self.busy = False  # queued for, or being sent by, a sender


class Responder:
    def __init__(self, metrics: ServingMetrics, senders: int = SENDERS,
                 on_gone: Callable[[Stream], None] = lambda stream: None):
        """`on_gone(stream)` is called (from a sender) when a response could not be delivered."""
        self.metrics, self.on_gone = metrics, on_gone
        self._lock = threading.Lock()
        self._outboxes: dict[int, _Outbox] = {}  # id(stream) -> its outbox, until its final response
        self._ready: queue.SimpleQueue[list[_Outbox] | None] = queue.SimpleQueue()  # work for the senders
        self._gone: set[int] = set()  # id() of streams a send to failed: their client has gone
        self._threads = [threading.Thread(target=self._run, name=f"generate-responder-{i}", daemon=True)
                         for i in range(senders)]
        for thread in self._threads:
            thread.start()

    def tokens(self, batch: list[tuple[Stream, int, str | None]]) -> None:
        """One step's tokens: (stream, token, outcome); an outcome marks the request's last token."""
        ready = []
        with self._lock:
            for stream, token, outcome in batch:
                box = self._box(stream)
                box.tokens.append(token)
                if outcome is not None:
                    box.outcome = outcome
                if not box.busy:
                    box.busy = True
                    ready.append(box)
        senders = len(self._threads)
        for part in (ready[i::senders] for i in range(min(senders, len(ready)))):  # one hand-off per sender
            self._ready.put(part)

    def fail(self, stream: Stream, message: str) -> None:
        self._last(stream, "failed", message)

    def end(self, stream: Stream) -> None:
        """End a stream whose client has gone (its pending tokens are dropped)."""
        self._last(stream, "cancelled", None)

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
        for _ in self._threads:
            self._ready.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def _box(self, stream: Stream) -> _Outbox:
        box = self._outboxes.get(id(stream))
        if box is None:
            box = self._outboxes[id(stream)] = _Outbox(stream)
        return box

    def _last(self, stream: Stream, outcome: str, error: str | None) -> None:
        with self._lock:
            box = self._box(stream)
            box.outcome, box.error = outcome, error
            if box.busy:
                return
            box.busy = True
        self._ready.put([box])

    def _run(self) -> None:
        while (boxes := self._ready.get()) is not None:
            for box in boxes:
                self._send(box)
            # drop the references before waiting again: Triton unloads `generate` only once every
            # response sender it handed out has been released
            del boxes, box

    def _send(self, box: _Outbox) -> None:
        """Everything `box` holds now, as one response; handed back to the queue if more came meanwhile."""
        with self._lock:
            tokens, box.tokens = box.tokens, []
            outcome, error = box.outcome, box.error
        started = time.perf_counter()
        if outcome == "failed":
            delivered = _quietly(box.stream.fail, error)
        elif outcome == "cancelled":
            delivered = _quietly(box.stream.end)
        else:
            delivered = _quietly(box.stream.send, tokens, outcome is not None)
        self.metrics.sent(time.perf_counter() - started)
        if delivered is False:  # Triton refuses responses to a cancelled request
            self._gone.add(id(box.stream))
            if outcome is None:
                self.on_gone(box.stream)
        with self._lock:
            if outcome is not None:  # the request is over; its id may be reused
                del self._outboxes[id(box.stream)]
                self._gone.discard(id(box.stream))
                requeue = False
            else:
                requeue = bool(box.tokens or box.outcome)
                box.busy = requeue
        if outcome is not None:
            self.metrics.finished("cancelled" if delivered is False and outcome == "completed" else outcome)
        elif requeue:
            self._ready.put([box])


def _quietly(call, *args):
    """Responses to a client that has gone may raise; that must not stop the server. False when it raised."""
    try:
        return call(*args)
    except Exception:
        return False
