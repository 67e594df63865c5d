"""The server's driver around the decode loop (runtime.serving.decode_loop, the engine core stepping).

The loop runs in a process of its own in the server, shared by every instance of `generate`
(`Scheduler.in_process`: the first instance starts it, the others join it), or in a thread
(`Scheduler(decoder, ...)`, for tests and library use); either way this side only talks to it over
a Connection. `submit` sends a request on, a receiver thread turns each step's events into work for
the Responder's sender threads, and a watcher thread asks Triton every `cancel_check_s` whether a
client has gone (a round trip) and sends a cancellation. Nothing here waits on the decoder.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Client
from pathlib import Path
from typing import Callable

from ..decoding.base import Decoder
from ..decoding.engine import CANCELLED, FAILED, PREFILL_TOKENS, Engine
from .decode_loop import AUTHKEY_VARIABLE, SHUTDOWN, decoder_facts, serve_engine, settings_fields
from .limits import Limits
from .metrics import ServingMetrics
from .requests import GenerateRequest
from .responder import SENDERS, Responder, Stream

CANCEL_CHECK_S = 0.1  # how often the watcher asks about each request's client (a round trip to the server)
START_S = 600.0  # how long the decode process may take to open its decoder (CUDA graphs are captured then)


class SchedulerError(RuntimeError):
    """The decode process could not be started."""


def rendezvous(model: Path, backend: str, rows: int, gpu: int | None = None) -> Path:
    """The private folder where this server's instances of `generate` find their decode process:
    one per server process (the stubs' parent), decoder and GPU."""
    from .stale import remove_killed_servers_folders, rendezvous_name

    digest = hashlib.sha256(f"{Path(model).resolve()}|{backend}|{rows}|{gpu}".encode()).hexdigest()[:16]
    remove_killed_servers_folders()  # those of servers killed outright
    folder = Path(tempfile.gettempdir()) / rendezvous_name(os.getppid(), digest)
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def visible_device(gpu: int) -> str:
    """CUDA_VISIBLE_DEVICES for a process that is to see only the server's GPU `gpu`: Triton counts
    GPUs among those the server sees, so a server started on "2,3" means "3" by GPU 1."""
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return visible[gpu] if gpu < len(visible) else str(gpu)


class Scheduler:
    def __init__(self, decoder: Decoder | None, limits: Limits, metrics: ServingMetrics | None = None,
                 log: Callable[[str], None] = lambda message: None, senders: int = SENDERS,
                 cancel_check_s: float = CANCEL_CHECK_S, prefill_tokens: int = PREFILL_TOKENS, _conn=None,
                 _facts: dict | None = None, _process: subprocess.Popen | None = None):
        """With a decoder: the decode loop runs over it in a thread of this process."""
        self.limits, self.log, self.cancel_check_s = limits, log, cancel_check_s
        self.metrics = metrics or ServingMetrics()
        self._loop_thread = None
        if decoder is not None:
            self._conn, far = Pipe()
            engine = Engine(decoder, rows=limits.max_rows, prefill_tokens=prefill_tokens,
                            overlap=decoder.queues_steps)
            engine.warm_up()  # as the decode process does: not during the first requests
            self._loop_thread = threading.Thread(target=serve_engine, args=(far, engine), name="generate-decode",
                                                 daemon=True)
            self.facts = decoder_facts(decoder)
        else:
            self._conn, self.facts = _conn, _facts
        self._process = _process
        self._send_lock = threading.Lock()  # submit, the watcher and close all write to the loop
        self._streams: dict[int, Stream] = {}  # request id -> its stream, until its last event
        self._ids = itertools.count()
        self._queued = 0  # requests waiting for a row, as the loop last reported plus those sent since
        self._running = 0  # rows decoding, as the loop last reported (free rows take requests without a wait)
        self._closing, self._broken = False, None
        self._stopped = threading.Event()
        self.abandoned = 0  # requests failed at shutdown because the drain timed out
        self._responder = Responder(self.metrics, senders, on_gone=self._gone)
        self._receiver = threading.Thread(target=self._receive, name="generate-receive", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="generate-cancel-watch", daemon=True)

    @classmethod
    def in_process(cls, model: Path, backend: str, limits: Limits, python: str | None = None, gpu: int | None = None,
                   **options) -> "Scheduler":
        """Connect to the decode process that serves `model` for this server's instances of
        `generate` (on GPU `gpu`, which that process alone then sees), starting it (on `python`)
        if no instance has yet."""
        folder = rendezvous(model, backend, limits.max_rows, gpu)
        address, key_file, error_file = folder / "loop.sock", folder / "key", folder / "error"
        process = None
        with open(folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one instance starts the process; the others wait and join it
            conn = _connect(address, key_file)
            if conn is None:
                key = secrets.token_bytes(16)
                key_file.write_bytes(key)
                error_file.unlink(missing_ok=True)
                spec = {"model": str(model), "backend": backend, "rows": limits.max_rows, "address": str(address),
                        "error_file": str(error_file), "prefill_tokens": options.pop("prefill_tokens", PREFILL_TOKENS)}
                env = dict(os.environ, **{AUTHKEY_VARIABLE: key.hex()})
                env["PYTHONPATH"] = os.pathsep.join(part for part in sys.path if part)  # what this interpreter imports
                if gpu is not None:  # its decoder, cache and CUDA graphs live on that GPU alone
                    env["CUDA_VISIBLE_DEVICES"] = visible_device(gpu)
                process = subprocess.Popen([python or sys.executable, "-m", "runtime.serving.decode_loop",
                                            json.dumps(spec)], env=env)
                deadline = time.monotonic() + START_S
                while not address.exists() and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not address.exists():
                    process.kill()
                    reason = error_file.read_text() if error_file.exists() else f"exit code {process.wait(30)}; see the log"
                    raise SchedulerError(f"the decode process could not open {model.name}: {reason}")
                conn = _connect_started(address, key_file, process, deadline)
                if conn is None:
                    process.kill()
                    raise SchedulerError(f"the decode process for {model.name} did not accept a connection")
        kind, facts = conn.recv()
        return cls(None, limits, _conn=conn, _facts=facts, _process=process, **options)

    @property
    def pid(self) -> int:
        """The decode process (this process when the loop runs in a thread)."""
        return self.facts.get("pid", os.getpid())

    def start(self) -> "Scheduler":
        if self._loop_thread is not None:
            self._loop_thread.start()
        self._receiver.start()
        self._watcher.start()
        return self

    @property
    def started(self) -> bool:
        return self._receiver.ident is not None

    def submit(self, request: GenerateRequest, stream: Stream) -> None:
        """Send a request to the decode loop, or refuse it at once (shutting down, queue full, loop gone)."""
        with self._send_lock:
            if self._broken:
                reason = self._broken
            elif self._closing:
                reason = "the server is shutting down; retry on another server"
            elif (waiting := self._queued - max(self.limits.max_rows - self._running, 0)) >= self.limits.max_queue:
                reason = (f"the server is busy: every row is taken and {waiting} requests already wait "
                          f"(--queue {self.limits.max_queue}); retry later")
            else:
                request_id = next(self._ids)
                self._streams[request_id] = stream
                self._queued += 1
                try:
                    self._conn.send(("submit", request_id, request.prompt, settings_fields(request.settings),
                                     request.cancel_key))
                    return
                except OSError:
                    del self._streams[request_id]
                    reason = "the decode loop has stopped; retry on another server"
        self.metrics.finished("rejected")
        _quietly(stream.fail, reason)

    def close(self, timeout: float = 30.0) -> bool:
        """Refuse new requests, let waiting and active ones finish for up to `timeout` seconds, then
        fail what is left. True when everything finished in time."""
        with self._send_lock:
            self._closing = True
            try:
                self._conn.send(("close", timeout))
            except OSError:
                pass
        if not self.started:  # never started: let the loop report what it holds, then stop
            if self._loop_thread is not None:
                self._loop_thread.start()
            self._receiver.start()
        self._receiver.join(timeout + 10.0)
        self._stopped.set()
        self._conn.close()
        if self._process is not None:  # started here: reap it once every instance has left (it ends then)
            threading.Thread(target=self._process.wait, daemon=True).start()
        return not self._receiver.is_alive() and self.abandoned == 0

    def _receive(self) -> None:
        """Each step's events to the responder, until the loop reports it has closed or goes away."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "closed":
                    self._abandon(message[1])
                    break
                _, events, rows, seconds, admitted, running, waiting, publishes = message
                self._deliver(events)
                if rows:
                    self.metrics.step(rows, seconds, admitted)
                with self._send_lock:
                    self._queued = waiting  # requests sent since the loop counted are counted at its next step
                    self._running = running
                if publishes:  # one driver publishes the shared batch's gauges
                    self.metrics.rows(running, waiting)
        except (EOFError, OSError):
            self._broken = "the decode loop has stopped; retry on another server"
            if not self._closing:
                self.log("generate: the decode process stopped; failing its requests")
            self._abandon(list(self._streams))
        finally:
            self._stopped.set()
            self._responder.close()
            self.metrics.rows(0, 0)

    def _deliver(self, events: list[tuple]) -> None:
        batch, streams = [], self._streams
        for request_id, token, finish, error, cause in events:
            stream = streams[request_id] if finish is None else streams.pop(request_id)
            if finish == CANCELLED:
                self._responder.end(stream)
            elif finish == FAILED:
                self.log(f"generate: {error}")
                message = error if cause is None else f"decoding failed on the server ({cause}); retry the request"
                self._responder.fail(stream, message)
            else:
                batch.append((stream, token, None if finish is None else "completed"))
        self._responder.tokens(batch)
        self.metrics.tokens(len(batch))

    def _abandon(self, request_ids: list[int]) -> None:
        self.abandoned = len(request_ids)
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._responder.fail(stream, SHUTDOWN)

    def cancel_key(self, key: str) -> None:
        """Cancel the request submitted with `key`, here or through another instance (the decode loop
        holds the keys); a key whose request has not come yet cancels it when it comes."""
        with self._send_lock:
            try:
                self._conn.send(("cancel_key", key))
            except OSError:
                pass

    def _gone(self, stream: Stream) -> None:
        """A sender could not deliver to `stream`: cancel its request."""
        for request_id, known in list(self._streams.items()):
            if known is stream:
                self._cancel(request_id)

    def _cancel(self, request_id: int) -> None:
        with self._send_lock:
            try:
                self._conn.send(("cancel", request_id))
            except OSError:
                pass

    def _watch(self) -> None:
        """Ask about each request's client, cancel the gone ones."""
        while not self._stopped.wait(max(self.cancel_check_s, 0.001)):
            self._check_clients()

    def _check_clients(self) -> None:
        """One round of the watcher (a function, so no stream outlives it in a local: Triton
        unloads `generate` only once every response sender has been released)."""
        for request_id, stream in list(self._streams.items()):
            if self._responder.gone(stream):
                self._cancel(request_id)


def _connect(address: Path, key_file: Path):
    """A connection to the decode process listening at `address`, or None when none listens (a
    socket left by one that died is removed)."""
    if not address.exists():
        return None
    try:
        return Client(str(address), authkey=key_file.read_bytes())
    except (ConnectionRefusedError, FileNotFoundError):
        address.unlink(missing_ok=True)
        return None


def _connect_started(address: Path, key_file: Path, process: subprocess.Popen, deadline: float):
    """A connection to the decode process just started: its socket file appears when it binds, a
    moment before it listens, and a connection in between is refused (once, on two busy cores, serve
    failed to start that way). Refused connections are retried while it runs, until `deadline`."""
    while True:
        try:
            return Client(str(address), authkey=key_file.read_bytes())
        except ConnectionRefusedError:
            if process.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        except FileNotFoundError:
            return None


def _quietly(call, *args) -> None:
    """Responses to a client that has gone may raise; that must not stop the scheduler."""
    try:
        call(*args)
    except Exception:
        pass
