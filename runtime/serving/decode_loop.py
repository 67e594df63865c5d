"""The server's decode loop: the engine core stepping as long as it has work, fed and read over one
multiprocessing Connection.

The server runs it in a process of its own (`python -m runtime.serving.decode_loop ADDRESS`), so
no sender thread ever competes with it for a GIL: every PyTorch call releases and re-takes the GIL,
and with senders in the same interpreter each re-take could wait behind a send's Python. Tests and
library users run the same loop in a thread over a Pipe (Scheduler.in_thread).

Messages in: ("submit", id, prompt, settings fields), ("cancel", id), ("close", seconds).
Messages out: ("ready", decoder facts), then per step ("events", [(id, token, finish, error, cause)],
rows decoded, step seconds, rows running, requests waiting), and last ("closed", ids abandoned).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import astuple

from ..decoding.engine import CANCELLED, FAILED, PREFILL_TOKENS, Engine
from ..decoding.settings import GenerationSettings

WAIT_S = 0.5  # an idle loop re-checks for messages this often
AUTHKEY_VARIABLE = "ROTARY_DECODE_AUTHKEY"


def settings_fields(settings: GenerationSettings) -> tuple:
    return astuple(settings)


def decoder_facts(decoder) -> dict:
    """What the server needs to know of the decoder it does not hold."""
    return {"name": decoder.name, "mode": decoder.mode, "vocab_size": decoder.vocab_size,
            "max_length": decoder.max_length, "capacity_hint": decoder.capacity_hint, "rows": decoder.rows}


def serve_engine(conn, engine: Engine) -> None:
    """Step `engine` while it has work, taking requests and cancellations from `conn` between steps
    and sending each step's events back; returns after ("close", seconds) once it is idle or the
    seconds are over (what is left is reported abandoned), or when the other end has gone."""
    ids: dict[int, int] = {}  # engine handle -> request id
    handles: dict[int, int] = {}  # request id -> engine handle
    out: list[tuple] = []
    deadline = None
    try:
        while True:
            idle = engine.idle
            if idle and deadline is not None:
                break
            if conn.poll(WAIT_S if idle and not out else 0):
                while True:
                    deadline = _take(conn.recv(), engine, ids, handles, out, deadline)
                    if not conn.poll(0):
                        break
            if deadline is not None and time.monotonic() > deadline:
                break
            rows, seconds = 0, 0.0
            if not engine.idle:
                started = time.perf_counter()
                events = engine.step()
                seconds, rows = time.perf_counter() - started, engine.stats.rows
                for event in events:
                    request = ids[event.request]
                    if event.finish:
                        del ids[event.request], handles[request]
                    out.append((request, event.token, event.finish, event.error, event.cause))
            if out or rows:
                conn.send(("events", out, rows, seconds, engine.running, engine.waiting))
                out = []
        for handle in list(ids):
            engine.cancel(handle)
        conn.send(("closed", list(ids.values())))
    except (EOFError, OSError, BrokenPipeError):  # the server has gone: nothing to report to
        for handle in list(ids):
            engine.cancel(handle)


def _take(message: tuple, engine: Engine, ids: dict, handles: dict, out: list, deadline):
    kind = message[0]
    if kind == "submit":
        _, request, prompt, fields = message
        try:
            handle = engine.submit(prompt, GenerationSettings(*fields))
        except Exception as error:  # the server checked the request; a decoder may still refuse it
            out.append((request, None, FAILED, f"the request cannot be decoded: {error}", None))
        else:
            ids[handle], handles[request] = request, handle
    elif kind == "cancel":
        handle = handles.pop(message[1], None)
        if handle is not None and engine.cancel(handle):
            del ids[handle]
            out.append((message[1], None, CANCELLED, None, None))
    elif kind == "close":
        deadline = time.monotonic() + message[1]
    return deadline


def main(argv: list[str] | None = None) -> int:
    """The decode process: connect back to the server, open the decoder it names, report, loop."""
    import signal
    from multiprocessing.connection import Client

    from ..decoding.open import open_decoder

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server ends it (by closing the connection), not Ctrl-C
    address = (argv or sys.argv[1:])[0]
    conn = Client(address, authkey=bytes.fromhex(os.environ.pop(AUTHKEY_VARIABLE)))
    spec = conn.recv()
    try:
        decoder = open_decoder(spec["model"], spec["backend"], rows=spec["rows"])
    except Exception as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return 1
    with decoder:
        engine = Engine(decoder, rows=spec["rows"], prefill_tokens=spec.get("prefill_tokens", PREFILL_TOKENS))
        engine.warm_up()
        conn.send(("ready", decoder_facts(decoder)))
        serve_engine(conn, engine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
