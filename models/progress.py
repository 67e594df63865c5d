"""Progress for steps that take more than a few seconds: a line when the step starts, then a line
every few seconds while it runs, so no command is silent for long (tracing a model, verifying it,
building an engine, warming up). The interval is ROTARY_PROGRESS_SECONDS (default 5)."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Iterator

DEFAULT_SECONDS = 5.0


def interval() -> float:
    """Seconds between two `still ...` lines: ROTARY_PROGRESS_SECONDS, else 5."""
    try:
        value = float(os.environ.get("ROTARY_PROGRESS_SECONDS", DEFAULT_SECONDS))
    except ValueError:
        return DEFAULT_SECONDS
    return value if value > 0 else DEFAULT_SECONDS


@contextlib.contextmanager
def phase(log: Callable[[str], None], what: str, start: str | None = None) -> Iterator[None]:
    """Log `start` (default `what ...`; "" logs nothing) now, then `  still what (N s) ...` every
    interval() seconds until the block ends. `log` is called from a helper thread too: it must write
    and flush a whole line per call."""
    if start != "":
        log(start if start is not None else f"{what} ...")
    started, stop = time.perf_counter(), threading.Event()

    def beat() -> None:
        every = interval()
        while not stop.wait(every):
            log(f"  still {what} ({time.perf_counter() - started:.0f} s) ...")

    thread = threading.Thread(target=beat, name=f"progress: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def quiet(_message: str) -> None:
    """A log that drops everything (library callers that want no progress)."""
