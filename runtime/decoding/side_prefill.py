"""Prefills that run beside the decode step: a second ONNX Runtime session of the same graph, a
thread that calls it and, on CUDA, a stream of its own.

A small model's decode step and a one-row prefill each replay a CUDA graph of short kernels that
leave most of the GPU idle, and each ONNX Runtime run blocks its calling thread until its stream is
done (without the GIL). So a prefill called from this thread while the decode thread steps runs
concurrently on the GPU, where in line it would add its whole time to the step. The caller orders
the two: what it queued before `run` happens first, and what it queues after the returned wait
happens after the prefill.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class SidePrefill:
    def __init__(self, on_cuda: bool, open_runner: Callable):
        """`open_runner(stream)`: the second session, running on `stream` (None off CUDA)."""
        self.on_cuda = on_cuda
        self.stream = torch.cuda.Stream() if on_cuda else None
        self.runner = open_runner(self.stream)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="side-prefill")
        self._unlaunched: list[Callable[[], None]] = []  # queue()'s work not launched yet
        self.closed = False

    def run(self, work: Callable[[], None]) -> Callable[[], None]:
        """Start `work` in the side thread (on the side stream, after everything the caller queued);
        returns the call that waits for it and orders the caller's later work after it."""
        ready = self._record(None)
        future = self._thread.submit(self._work, work, ready)

        def wait() -> None:
            done, error = future.result()
            if done is not None:  # also after a failure: what was queued may still write the caller's memory
                torch.cuda.current_stream().wait_event(done)
            if error is not None:
                raise error

        return wait

    def queue(self, work: Callable[[], None]) -> Callable[[], None]:
        """`work` that only queues (recorded graphs' replays), ordered on the side stream after
        everything the caller has queued so far; returns the call that queues it there, in this
        thread, if it is not yet, and orders the caller's later work after it. The caller makes that
        call once it has queued its step: launching a prefill graph holds the host for a while, and
        launched first it held back the step's own launch. A step that blocks the host until it has
        run (one not replayed as a recorded graph) calls launch_queued() first, so that the prefill
        still runs beside it."""
        ready = self._record(None)
        outcome: list = []  # once launched: [the event after the work or None, its exception or None]

        def launch() -> None:
            if outcome:
                return
            if self.closed:
                raise RuntimeError("the side prefill was closed before its work was queued")
            outcome.extend(self._work(work, ready))  # as the side thread runs it, here in this thread

        def wait() -> None:
            if launch in self._unlaunched:
                self._unlaunched.remove(launch)
            launch()
            done, error = outcome
            if done is not None:
                torch.cuda.current_stream().wait_event(done)
            if error is not None:
                raise error

        self._unlaunched.append(launch)
        return wait

    def launch_queued(self) -> None:
        """Queue now, on the side stream, the work queue() took that no wait has queued yet (its
        errors surface at its wait)."""
        launches, self._unlaunched = self._unlaunched, []
        for launch in launches:
            launch()

    def _work(self, work: Callable[[], None], ready):
        """(the event after the work, the exception it raised or None)."""
        error = None
        with torch.cuda.stream(self.stream) if self.on_cuda else contextlib.nullcontext():
            if ready is not None:
                self.stream.wait_event(ready)
            try:
                work()
            except Exception as raised:
                error = raised
            return self._record(self.stream), error

    def _record(self, stream):
        if not self.on_cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def close(self) -> None:
        self.closed, self._unlaunched = True, []
        self._thread.shutdown(wait=True)
        if self.stream is not None:  # its copies may still run into buffers the decoder frees next
            self.stream.synchronize()
        self.runner.close()
