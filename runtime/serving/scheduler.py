"""In-flight batching over one Decoder.

One thread owns the decoder. Between decode steps it admits waiting requests into free rows
(`decoder.start`), drops rows whose client went away, steps every active row at its own position,
samples every row with its own settings and generator (one batched choice per step), hands the
tokens to the Responder's sender threads and releases finished rows, so requests join and leave
the running batch at any step.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..decoding.base import Decoder
from ..decoding.generation import RowSampler, choose_tokens, draw_noise
from .limits import Limits
from .metrics import ServingMetrics
from .requests import GenerateRequest
from .responder import SENDERS, Responder, Stream

WAIT_S = 0.5  # an idle scheduler re-checks for shutdown this often
CANCEL_CHECK_S = 0.05  # asking Triton whether a client has gone is a round trip: each row this often


@dataclass
class _Row:
    request: GenerateRequest
    stream: Stream
    sampler: RowSampler
    checked: float = 0.0  # when the client was last asked about (time.monotonic)


class Scheduler:
    def __init__(self, decoder: Decoder, limits: Limits, metrics: ServingMetrics | None = None,
                 log: Callable[[str], None] = lambda message: None, senders: int = SENDERS,
                 cancel_check_s: float = CANCEL_CHECK_S):
        self.decoder, self.limits, self.log = decoder, limits, log
        self.metrics = metrics or ServingMetrics()
        self._waiting: collections.deque[tuple[GenerateRequest, Stream]] = collections.deque()
        self._rows: dict[int, _Row] = {}
        self._free = list(range(min(limits.max_rows, decoder.rows)))
        self._wake = threading.Condition()
        self._closing, self._deadline = False, float("inf")
        self._thread = threading.Thread(target=self._run, name="generate-scheduler", daemon=True)
        self._responder = Responder(self.metrics, senders)
        self.cancel_check_s = cancel_check_s
        self._noise = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate-noise")

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, request: GenerateRequest, stream: Stream) -> None:
        """Queue a request, or refuse it at once (shutting down, or the queue is full)."""
        with self._wake:
            if self._closing:
                reason = "the server is shutting down; retry on another server"
            elif len(self._waiting) >= self.limits.max_queue:
                reason = (f"the server is busy: {len(self._waiting)} requests already wait for a row "
                          f"(max_queue {self.limits.max_queue}); retry later")
            else:
                self._waiting.append((request, stream))
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
        return not self._thread.is_alive() and self.abandoned == 0

    abandoned = 0  # requests failed at shutdown because the drain timed out

    def _run(self) -> None:
        while True:
            with self._wake:
                if not (self._waiting or self._rows or self._closing):
                    self._wake.wait(WAIT_S)
                idle = not (self._waiting or self._rows)
                if self._closing and (idle or time.monotonic() > self._deadline):
                    break
                admitted = [self._waiting.popleft() for _ in range(min(len(self._free), len(self._waiting)))]
            self._guarded(self._admit, admitted, only_new=True)
            self._drop_cancelled()
            if self._rows:
                self._guarded(self._step)
            self.metrics.rows(len(self._rows), len(self._waiting))
        self.abandoned = len(self._rows) + len(self._waiting)
        message = "the server shut down before this request finished; retry it"
        self._fail(list(self._rows), message)
        while self._waiting:
            self._responder.fail(self._waiting.popleft()[1], message)
        self._responder.close()
        self._noise.shutdown(wait=False)
        self.metrics.rows(0, 0)

    def _guarded(self, work, *args, only_new: bool = False) -> None:
        """Run one admission or step; a decoder failure fails the rows involved (`only_new`: the rows
        this admission started), never the server."""
        before = set(self._rows)
        try:
            work(*args)
        except Exception as error:
            self.log(f"generate: decoding failed ({type(error).__name__}: {error})")
            involved = [row for row in self._rows if not (only_new and row in before)]
            self._fail(involved, f"decoding failed on the server ({type(error).__name__}); retry the request")

    def _admit(self, admitted: list[tuple[GenerateRequest, Stream]]) -> None:
        starting: dict[int, _Row] = {}
        for request, stream in admitted:
            if self._responder.gone(stream):
                self._responder.end(stream)
            else:
                starting[self._free.pop(0)] = _Row(request, stream, RowSampler(request.settings))
        if not starting:
            return
        self._rows.update(starting)  # before start(): a failure then fails and frees these rows too
        logits = self.decoder.start({row: entry.request.prompt for row, entry in starting.items()})
        self._emit(list(starting), logits)

    def _step(self) -> None:
        active = self.decoder.active
        tokens = torch.tensor([self._rows[row].sampler.tokens[-1] for row in active], dtype=torch.int64)
        started = time.perf_counter()
        # the sampled rows' noise is drawn on the CPU while the decoder runs (both release the GIL)
        noise = self._noise.submit(draw_noise, [self._rows[row].sampler for row in active], self.decoder.vocab_size)
        logits = self.decoder.step(tokens)
        self._emit(active, logits, noise.result())
        self.metrics.step(len(active), time.perf_counter() - started)

    def _emit(self, rows: list[int], logits: torch.Tensor, noise: list | None = None) -> None:
        """Choose every row's next token with its own settings, queue the tokens for sending,
        release finished rows."""
        entries = [self._rows[row] for row in rows]
        tokens = choose_tokens([entry.sampler for entry in entries], logits, noise)
        batch = []
        for row, entry, token in zip(rows, entries, tokens):
            done = entry.sampler.done
            batch.append((entry.stream, token, "completed" if done else None))
            if done:
                self._finish(row)
        self._responder.tokens(batch)
        self.metrics.tokens(len(rows))

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for row, entry in list(self._rows.items()):
            if now - entry.checked < self.cancel_check_s:
                continue
            entry.checked = now
            if self._responder.gone(entry.stream):
                self._responder.end(entry.stream)
                self._finish(row)

    def _fail(self, rows: list[int], message: str) -> None:
        for row in rows:
            self._responder.fail(self._rows[row].stream, message)
            self._finish(row)

    def _finish(self, row: int) -> None:
        del self._rows[row]
        self.decoder.release([row])
        self._free.append(row)
        self._free.sort()


def _quietly(call, *args) -> None:
    """Responses to a client that has gone may raise; that must not stop the scheduler."""
    try:
        call(*args)
    except Exception:
        pass
