"""The server's driver around the engine core (runtime.decoding.engine).

One thread owns the engine and the decoder: it takes new requests and cancellations from an inbox,
runs `engine.step()` and hands the step's tokens to the Responder, whose sender threads send them.
A watcher thread asks Triton every `cancel_check_s` whether a client has gone (a round trip that
must not sit on the decode thread) and posts a cancellation. So the decode thread does no I/O.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from ..decoding.base import Decoder
from ..decoding.engine import FAILED, PREFILL_TOKENS, Engine, TokenEvent
from .limits import Limits
from .metrics import ServingMetrics
from .requests import GenerateRequest
from .responder import SENDERS, Responder, Stream

WAIT_S = 0.5  # an idle decode thread re-checks for shutdown this often
CANCEL_CHECK_S = 0.05  # how often the watcher asks about each running request's client


class Scheduler:
    def __init__(self, decoder: Decoder, limits: Limits, metrics: ServingMetrics | None = None,
                 log: Callable[[str], None] = lambda message: None, senders: int = SENDERS,
                 cancel_check_s: float = CANCEL_CHECK_S, prefill_tokens: int = PREFILL_TOKENS):
        self.limits, self.log, self.cancel_check_s = limits, log, cancel_check_s
        self.metrics = metrics or ServingMetrics()
        self.engine = Engine(decoder, rows=limits.max_rows, prefill_tokens=prefill_tokens)
        self._inbox: collections.deque[tuple[GenerateRequest, Stream]] = collections.deque()
        self._cancels: collections.deque[int] = collections.deque()
        self._streams: dict[int, Stream] = {}  # engine handle -> its stream, while the engine holds it
        self._queued = 0  # requests in the inbox or waiting in the engine
        self._wake = threading.Condition()
        self._closing, self._deadline = False, float("inf")
        self._stopped = threading.Event()
        self._responder = Responder(self.metrics, senders, on_gone=self._gone)
        self._thread = threading.Thread(target=self._run, name="generate-decode", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="generate-cancel-watch", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        self._watcher.start()
        return self

    def submit(self, request: GenerateRequest, stream: Stream) -> None:
        """Queue a request, or refuse it at once (shutting down, or the queue is full)."""
        with self._wake:
            if self._closing:
                reason = "the server is shutting down; retry on another server"
            elif self._queued >= self.limits.max_queue:
                reason = (f"the server is busy: {self._queued} requests already wait for a row "
                          f"(max_queue {self.limits.max_queue}); retry later")
            else:
                self._inbox.append((request, stream))
                self._queued += 1
                self._wake.notify()
                return
        self.metrics.finished("rejected")
        _quietly(stream.fail, reason)

    def close(self, timeout: float = 30.0) -> bool:
        """Refuse new requests, let waiting and active ones finish for up to `timeout` seconds, then
        fail what is left. True when everything finished in time."""
        with self._wake:
            self._closing, self._deadline = True, time.monotonic() + timeout
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout + 10.0)
        self._stopped.set()
        return not self._thread.is_alive() and self.abandoned == 0

    abandoned = 0  # requests failed at shutdown because the drain timed out

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                if not (self._inbox or self._cancels or not engine.idle or self._closing):
                    self._wake.wait(WAIT_S)
                incoming, self._inbox = list(self._inbox), collections.deque()
                cancels, self._cancels = list(self._cancels), collections.deque()
                if self._closing and ((engine.idle and not incoming) or time.monotonic() > self._deadline):
                    self._inbox.extend(incoming)
                    break
            for handle in cancels:
                if engine.cancel(handle):
                    self._responder.end(self._streams.pop(handle))
            for request, stream in incoming:
                self._accept(request, stream)
            if not engine.idle:
                started = time.perf_counter()
                events = engine.step()
                self._deliver(events)
                if engine.stats.rows:  # a decode step (an admission alone is not counted as one)
                    self.metrics.step(engine.stats.rows, time.perf_counter() - started)
            with self._wake:
                self._queued = len(self._inbox) + engine.waiting
            self.metrics.rows(engine.running, self._queued)
        self._drain()

    def _accept(self, request: GenerateRequest, stream: Stream) -> None:
        try:
            handle = self.engine.submit(request.prompt, request.settings)
        except Exception as error:  # parse_request checked it; a decoder may still refuse
            self._responder.fail(stream, f"the request cannot be decoded: {error}")
            return
        self._streams[handle] = stream

    def _deliver(self, events: list[TokenEvent]) -> None:
        batch, streams = [], self._streams
        for event in events:
            stream = streams[event.request] if event.finish is None else streams.pop(event.request)
            if event.finish == FAILED:
                self.log(f"generate: {event.error}")
                self._responder.fail(stream, f"decoding failed on the server ({event.cause}); retry the request")
            else:
                batch.append((stream, event.token, None if event.finish is None else "completed"))
        self._responder.tokens(batch)
        self.metrics.tokens(len(batch))

    def _drain(self) -> None:
        """Shutting down: fail what is still here, then let the senders finish."""
        message = "the server shut down before this request finished; retry it"
        self.abandoned = len(self._streams) + len(self._inbox)
        for handle, stream in list(self._streams.items()):
            self.engine.cancel(handle)
            self._responder.fail(stream, message)
        self._streams.clear()
        while self._inbox:
            self._responder.fail(self._inbox.popleft()[1], message)
        self._stopped.set()
        self._responder.close()
        self.metrics.rows(0, 0)

    def _gone(self, stream: Stream) -> None:
        """A sender could not deliver to `stream`: cancel its request."""
        for handle, known in list(self._streams.items()):
            if known is stream:
                self._post_cancel(handle)

    def _post_cancel(self, handle: int) -> None:
        with self._wake:
            self._cancels.append(handle)
            self._wake.notify()

    def _watch(self) -> None:
        """Off the decode thread: ask about each running request's client, cancel the gone ones."""
        while not self._stopped.wait(max(self.cancel_check_s, 0.001)):
            for handle, stream in list(self._streams.items()):
                if self._responder.gone(stream):
                    self._post_cancel(handle)


def _quietly(call, *args) -> None:
    """Responses to a client that has gone may raise; that must not stop the scheduler."""
    try:
        call(*args)
    except Exception:
        pass

