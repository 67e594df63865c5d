"""The server's decode loop: the engine core stepping as long as it has work, fed and read over
multiprocessing Connections, one per driver (a Scheduler).

In the server it runs in a process of its own (`python -m runtime.serving.decode_loop SPEC`), shared
by every instance of `generate`: it opens the decoder, then listens on the socket the spec names,
and each python-backend instance that connects feeds the same batch. So no sender thread ever
competes with the loop for a GIL, and the Python work of sending responses is spread over as many
processes as there are instances. Tests and library users run the same loop in a thread over a Pipe
(Scheduler(decoder, ...)).

Messages in: ("submit", id, prompt, settings fields, cancel key or None), ("cancel", id),
("cancel_key", key), ("close", seconds). A cancel key names a request whichever driver submitted
it (the instances of `generate` share this loop, and a client's cancel request may reach another
instance than its request); a key whose request has not come yet cancels it when it comes, within
EARLY_KEY_S.
SIGTERM to the process fails every request it holds or gets later with SHUTDOWN (serve sends it
when the drain at shutdown is over); it ends as usual, when its drivers have left.
Messages out: ("ready", decoder facts) to a driver that connects to the process; then per step
("events", [(id, token, finish, error, cause)], rows decoded, step seconds, requests admitted, rows
running, requests waiting, publishes), and last ("closed", ids abandoned). Request ids are each
driver's own. Step figures go to one driver at a time (`publishes`), so metrics summed over
instances count a step once.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import astuple
from multiprocessing.connection import Pipe, wait
from pathlib import Path
from typing import Callable

from ..decoding.engine import CANCELLED, FAILED, PREFILL_TOKENS, Engine
from ..decoding.settings import GenerationSettings
from .signal_flag import SignalFlag

WAIT_S = 0.5  # an idle loop re-checks for messages this often
FIRST_DRIVER_S = 600.0  # the process ends if no driver connects within this
AUTHKEY_VARIABLE = "ROTARY_DECODE_AUTHKEY"
SHUTDOWN = "the server shut down before this request finished; retry it"
EARLY_KEY_S = 60.0  # how long a cancel key whose request has not come yet is kept
EARLY_KEYS = 10_000  # at most this many such keys are kept (the oldest go first)


def settings_fields(settings: GenerationSettings) -> tuple:
    return astuple(settings)


def decoder_facts(decoder) -> dict:
    """What the server needs to know of the decoder it does not hold."""
    return {"name": decoder.name, "mode": decoder.mode, "vocab_size": decoder.vocab_size,
            "max_length": decoder.max_length, "capacity_hint": decoder.capacity_hint, "rows": decoder.rows,
            "pid": os.getpid()}


class _Driver:
    """One connection: its requests in the engine, the events owed to it, its closing deadline."""

    def __init__(self, conn):
        self.conn = conn
        self.handles: dict[int, int] = {}  # request id -> engine handle
        self.out: list[tuple] = []
        self.deadline: float | None = None


class _Keys:
    """Cancel keys: the engine handle each names, and keys cancelled before their request came."""

    def __init__(self):
        self.handles: dict[str, int] = {}
        self.by_handle: dict[int, str] = {}
        self.early: dict[str, float] = {}  # key -> until when it waits for its request

    def add(self, key: str, handle: int) -> None:
        self.handles[key], self.by_handle[handle] = handle, key

    def forget(self, handle: int) -> None:
        key = self.by_handle.pop(handle, None)
        if key is not None:
            del self.handles[key]

    def cancelled_early(self, key: str) -> bool:
        """Whether `key` was cancelled before its request came (it is forgotten then)."""
        now = time.monotonic()
        while self.early and next(iter(self.early.values())) <= now:  # kept in the order they expire
            del self.early[next(iter(self.early))]
        return self.early.pop(key, None) is not None


class Arrivals:
    """Connections accepted by a listener thread, handed to the loop (which a wake-up pipe interrupts)."""

    def __init__(self, listener, facts: dict):
        self.listener, self.facts = listener, facts
        self.queue: queue.Queue = queue.Queue()
        self.wake, self._poke = Pipe(duplex=False)
        threading.Thread(target=self._accept, name="decode-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:  # the listener has closed
                return
            except Exception:  # a peer that failed the handshake (wrong key, or gone)
                continue
            try:
                conn.send(("ready", self.facts))
            except OSError:
                continue
            self.queue.put(conn)
            self._poke.send_bytes(b"")

    def take(self) -> list:
        while self.wake.poll():
            self.wake.recv_bytes()
        taken = []
        while not self.queue.empty():
            taken.append(self.queue.get_nowait())
        return taken


class _StepClock:
    """Each step's time from the step before's return, so that the loop's own work between steps
    counts: with the overlapped engine, step() returns once the step before is done, the next one
    queued, and its own duration is shorter than a step. The wait for work while idle is no step's."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now
        self.last: float | None = None  # when the last step returned, while the engine has had work since

    def step(self, engine: Engine) -> tuple[list, float]:
        started = self.now()
        events = engine.step()
        stepped = self.now()
        seconds = stepped - (started if self.last is None else self.last)
        self.last = None if engine.idle else stepped
        return events, seconds


def serve_engine(conn, engine: Engine, arrivals: Arrivals | None = None, stopping=None) -> None:
    """Step `engine` while it has work, taking requests from the drivers between steps and sending
    each driver its events. Starts with `conn` (None: wait for the first of `arrivals`) and takes
    on every connection that arrives; a driver leaves after ("close", seconds) once its requests are
    done or the seconds are over (what is left is reported abandoned), or when it goes away. Returns
    once every driver has left. Once `stopping` (anything with is_set(), e.g. a SignalFlag) is set,
    every request is failed with SHUTDOWN."""
    drivers = [_Driver(conn)] if conn is not None else []
    owners: dict[int, tuple[_Driver, int]] = {}  # engine handle -> (driver, request id)
    keys = _Keys()
    came, started = bool(drivers), time.monotonic()
    published = (0, 0)  # the rows running and requests waiting the publisher last heard
    clock = _StepClock()
    while True:
        if arrivals is not None:
            drivers += [_Driver(c) for c in arrivals.take()]
            came = came or bool(drivers)
        if not drivers and (came or arrivals is None or time.monotonic() - started > FIRST_DRIVER_S):
            break  # everyone has left (or nobody came)
        owed = any(d.out for d in drivers)
        sources = [d.conn for d in drivers] + ([arrivals.wake] if arrivals is not None else [])
        for ready in wait(sources, WAIT_S if engine.idle and not owed else 0):
            driver = next((d for d in drivers if d.conn is ready), None)
            if driver is not None:
                _read(driver, engine, owners, keys)
        if stopping is not None and stopping.is_set():
            for driver in drivers:
                _fail_all(driver, engine, owners, keys)
        rows, seconds, admitted = 0, 0.0, 0
        if engine.idle:
            clock.last = None
        else:
            events, seconds = clock.step(engine)
            rows, admitted = engine.stats.rows, engine.stats.admitted
            for event in events:
                if event.request not in owners:  # its driver has let it go since (cancelled, left): nobody to tell
                    continue
                driver, request = owners[event.request]
                if event.finish:
                    del owners[event.request], driver.handles[request]
                    keys.forget(event.request)
                driver.out.append((request, event.token, event.finish, event.error, event.cause))
        publisher = drivers[0] if drivers else None
        state = (engine.running, engine.waiting)
        for driver in list(drivers):
            publishes = driver is publisher
            if driver.out or (publishes and (rows or state != published)):
                published = state if publishes else published
                _send(driver, ("events", driver.out, rows if publishes else 0, seconds if publishes else 0.0,
                               admitted if publishes else 0, engine.running, engine.waiting, publishes))
                driver.out = []
            if driver.conn is None or (driver.deadline is not None and
                                       (not driver.handles or time.monotonic() > driver.deadline)):
                _leave(driver, engine, owners, keys)
                drivers.remove(driver)


def _read(driver: _Driver, engine: Engine, owners: dict, keys: _Keys) -> None:
    try:
        while driver.conn.poll(0):
            _take(driver.conn.recv(), engine, driver, owners, keys)
    except (EOFError, OSError):  # the driver has gone: nothing to report to
        driver.conn = None


def _send(driver: _Driver, message: tuple) -> None:
    if driver.conn is None:
        return
    try:
        driver.conn.send(message)
    except (EOFError, OSError, BrokenPipeError):
        driver.conn = None


def _leave(driver: _Driver, engine: Engine, owners: dict, keys: _Keys) -> None:
    """Cancel what the driver still has running and tell it which of its requests were abandoned."""
    for request, handle in driver.handles.items():
        engine.cancel(handle)
        del owners[handle]
        keys.forget(handle)
    _send(driver, ("closed", list(driver.handles)))
    driver.handles = {}
    if driver.conn is not None:
        driver.conn.close()


def _fail_all(driver: _Driver, engine: Engine, owners: dict, keys: _Keys) -> None:
    for request, handle in driver.handles.items():
        engine.cancel(handle)
        del owners[handle]
        keys.forget(handle)
        driver.out.append((request, None, FAILED, SHUTDOWN, None))
    driver.handles = {}


def _take(message: tuple, engine: Engine, driver: _Driver, owners: dict, keys: _Keys) -> None:
    out, handles = driver.out, driver.handles
    kind = message[0]
    if kind == "submit":
        _, request, prompt, fields, key = message
        if key is not None and key in keys.handles:
            out.append((request, None, FAILED, "cancel_key is in use by a running request; send a new random key",
                        None))
            return
        if key is not None and keys.cancelled_early(key):
            out.append((request, None, CANCELLED, None, None))
            return
        try:
            handle = engine.submit(prompt, GenerationSettings(*fields))
        except Exception as error:  # the server checked the request; a decoder may still refuse it
            out.append((request, None, FAILED, f"the request cannot be decoded: {error}", None))
        else:
            owners[handle], handles[request] = (driver, request), handle
            if key is not None:
                keys.add(key, handle)
    elif kind == "cancel":
        handle = handles.pop(message[1], None)
        if handle is not None:
            owners.pop(handle, None)
            keys.forget(handle)
            if engine.cancel(handle):
                out.append((message[1], None, CANCELLED, None, None))
    elif kind == "cancel_key":
        _cancel_key(message[1], engine, owners, keys)
    elif kind == "close":
        driver.deadline = time.monotonic() + message[1]


def _cancel_key(key: str, engine: Engine, owners: dict, keys: _Keys) -> None:
    """Cancel the request `key` names, whichever driver's it is; a key not known yet waits for it."""
    handle = keys.handles.get(key)
    if handle is None:
        if len(keys.early) >= EARLY_KEYS:
            del keys.early[next(iter(keys.early))]
        keys.early[key] = time.monotonic() + EARLY_KEY_S
        return
    keys.forget(handle)
    owner, request = owners.pop(handle, (None, None))
    if owner is not None and owner.handles.pop(request, None) is not None and engine.cancel(handle):
        owner.out.append((request, None, CANCELLED, None, None))


def prefills_beside(model: str) -> bool:
    """Whether the decoder prefills admitted prompts beside the step, in a second session that holds
    the graph's weights again: ROTARY_OVERLAP_PREFILL=1 or 0 says; by default yes where the graph's
    files (its external data named after it, as export-model and serve's repository write it) take
    under an eighth of the GPU's free memory (on the H200 it shortened the served step at 32 clients
    from 1.15 to 1.05 ms), no where a second copy of the weights would crowd the cache out."""
    asked = os.environ.get("ROTARY_OVERLAP_PREFILL")
    if asked in ("0", "1"):
        return asked == "1"
    import torch

    if not torch.cuda.is_available():
        return False  # prefills beside the step are a CUDA-graph feature
    path = Path(model)
    files = [f for f in path.parent.glob(f"{path.name}*") if f.is_file()] if path.exists() else []
    return 0 < sum(f.stat().st_size for f in files) * 8 < torch.cuda.mem_get_info()[0]


def main(argv: list[str] | None = None) -> int:
    """The decode process: open the decoder the spec names, listen on its socket, serve every driver
    that connects, end when the last has left. An error opening the decoder goes to the spec's
    error file (its one sentence is what the first driver reports)."""
    import signal
    from multiprocessing.connection import Listener

    from ..decoding.open import open_decoder

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server ends it (its drivers leave), not Ctrl-C
    stopping = SignalFlag()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    spec = json.loads((argv or sys.argv[1:])[0])
    key = bytes.fromhex(os.environ.pop(AUTHKEY_VARIABLE))
    try:
        # ROTARY_RECORD_STEP=0 replays ONNX Runtime's own step graph (for comparisons)
        decoder = open_decoder(spec["model"], spec["backend"], rows=spec["rows"],
                               overlap_prefill=prefills_beside(spec["model"]),
                               record_step=False if os.environ.get("ROTARY_RECORD_STEP") == "0" else None)
    except Exception as error:
        with open(spec["error_file"], "w") as file:
            file.write(f"{type(error).__name__}: {error}")
        return 1
    with decoder:
        engine = Engine(decoder, rows=spec["rows"], prefill_tokens=spec.get("prefill_tokens", PREFILL_TOKENS),
                        overlap=decoder.queues_steps)
        engine.warm_up()
        try:
            with Listener(spec["address"], authkey=key) as listener:  # the socket appears once the decoder is ready
                serve_engine(None, engine, Arrivals(listener, decoder_facts(decoder)), stopping)
        finally:  # the rendezvous folder (its key) first: closing the decoder can outlast the server's patience
            shutil.rmtree(os.path.dirname(spec["address"]), ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
