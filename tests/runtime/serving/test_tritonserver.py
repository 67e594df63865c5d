"""TritonServer's graceful stop against a fake HTTP layer: a slow answer is asked again, a refusal is not."""
from __future__ import annotations

import io
import json
import re
import urllib.error

import pytest

from runtime.serving import tritonserver
from runtime.serving.tritonserver import TritonServer


class Running:
    pid = 0

    def poll(self):
        return None


def _server(monkeypatch, answers: dict[str, list]) -> tuple[TritonServer, list[str]]:
    """A TritonServer whose process never ends and whose HTTP answers come from `answers` (per path:
    exceptions to raise or JSON bodies to return, in turn; the last one repeats)."""
    server = object.__new__(TritonServer)
    server.process, server.key, server.exit_timeout, server.stop_problem = Running(), "k", 30, None
    server.held, server.finalizing = [], set()
    server.endpoints = type("Endpoints", (), {"url": "http://127.0.0.1:1", "metrics_url": "http://127.0.0.1:1/metrics"})()
    answers.setdefault(METRICS, [busy(1)])
    asked: list[str] = []

    def urlopen(request, timeout):
        path = request.full_url.removeprefix("http://127.0.0.1:1")
        asked.append(path)
        queue = answers[path]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return io.BytesIO(answer.encode() if isinstance(answer, str) else json.dumps(answer).encode())

    monkeypatch.setattr(tritonserver.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(tritonserver, "POLL_S", 0.0)
    monkeypatch.setattr(tritonserver, "processes_below", lambda pid, depth: {42: "decode"} if depth == 2 else {})
    monkeypatch.setattr(tritonserver, "_signal", lambda pid, number: asked.append(f"signal {pid}"))
    return server, asked


UNLOAD, INDEX, METRICS = "/v2/repository/models/generate/unload", "/v2/repository/index", "/metrics"
UNLOADING = [{"name": "generate", "state": "UNLOADING"}]


def busy(rows: int = 0, queued: int = 0, unloading: int = 0, open_streams: int = 0, pending: int = 0) -> str:
    """Triton's /metrics text with generate's gauges over two instances (the values on the second)
    and Triton's pending-request count, and another model's gauges (always busy)."""
    gauges = {"active_rows": rows, "queue_length": queued, "unloading": unloading, "open_streams": open_streams}
    return ("".join(f'# HELP rotary_generate_{name} ...\n'
                    f'rotary_generate_{name}{{instance="generate_0_0",model="generate"}} 0\n'
                    f'rotary_generate_{name}{{instance="generate_0_1",model="generate"}} {value}\n'
                    for name, value in gauges.items())
            + f'nv_inference_pending_request_count{{model="generate",version="1"}} {pending}\n'
            + 'nv_inference_pending_request_count{model="other",version="1"} 3\n'
            + 'rotary_generate_active_rows{instance="other_0_0",model="other"} 5\n'
            + 'nv_inference_count{model="generate",version="1"} 12\n')


@pytest.mark.parametrize("answer", [TimeoutError("timed out"), [{"name": "generate", "state": "READY"}]])
def test_a_model_still_there_after_the_drain_is_reported(monkeypatch, answer):
    monkeypatch.setattr(tritonserver, "DRAIN_MARGIN_S", -9.99)  # the waits after the drain: 0.01 s
    server, asked = _server(monkeypatch, {UNLOAD: [{}], INDEX: [answer]})
    server.exit_timeout = -10  # the drain itself: no wait
    assert not server.unload("generate")
    assert server.stop_problem.startswith("generate was still loaded")
    assert "signal 42" in asked


def test_a_model_that_stays_loaded_with_nothing_in_flight_is_held_by_the_server(monkeypatch):
    """Triton 2.51 can keep a model loaded after clients cancelled gRPC streams: with no row
    decoding, nothing queued, no open stream, nothing pending in Triton and no instance finalizing,
    for HELD_S, serve stops waiting, and no decode process is signalled."""
    monkeypatch.setattr(tritonserver, "HELD_S", 0.05)
    server, asked = _server(monkeypatch, {UNLOAD: [{}], INDEX: [UNLOADING],
                                          METRICS: [busy(rows=2), busy(queued=1), busy()]})
    assert server.unload("generate")
    assert server.held == ["generate"] and server.stop_problem is None
    assert "signal 42" not in asked and asked.count(METRICS) >= 3


def test_idle_for_less_than_held_s_is_not_held_and_a_busy_sample_starts_the_count_again(monkeypatch):
    clock = iter(range(1000))  # each look at the clock: one second later
    monkeypatch.setattr(tritonserver.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(tritonserver, "HELD_S", 2.5)
    # idle, idle (1 s: not yet), busy, idle, idle, idle (2 s: not yet), idle (3 s: held)
    samples = [busy(), busy(), busy(open_streams=1), busy(), busy(), busy(), busy()]
    server, asked = _server(monkeypatch, {UNLOAD: [{}], INDEX: [UNLOADING], METRICS: samples})
    assert server._wait_unloaded("generate", 100) == "held"
    assert asked.count(METRICS) == 7


@pytest.mark.parametrize("metrics", [[busy(rows=1)], [busy(queued=2)], [busy(open_streams=1)], [busy(pending=1)],
                                     [busy(unloading=1), busy()],
                                     [urllib.error.URLError("refused")], ["# no gauges\n"],
                                     [busy().replace("rotary_generate_unloading", "other")],
                                     [busy().replace("} 0\n", "} zero\n")]])
def test_a_model_in_use_finalizing_or_unknown_is_not_taken_as_held(monkeypatch, metrics):
    """Rows, queued requests, a stream without its final response, a request Triton has not handed
    over, an instance whose finalize has begun (the unload then goes its normal way, however long it
    takes, even if the gauges look idle later), or gauges that cannot be read: serve waits, then
    fails what is left."""
    monkeypatch.setattr(tritonserver, "HELD_S", 0.0)
    monkeypatch.setattr(tritonserver, "DRAIN_MARGIN_S", -9.99)
    server, asked = _server(monkeypatch, {UNLOAD: [{}], INDEX: [UNLOADING], METRICS: metrics})
    server.exit_timeout = -10
    assert not server.unload("generate") and server.held == []
    assert server.stop_problem.startswith("generate was still loaded") and "signal 42" in asked


def test_the_gauges_read_for_a_held_model_are_the_ones_generate_publishes():
    from runtime.serving.triton_model import METRICS as PUBLISHED

    names = {name for name, _, _ in PUBLISHED.values()}
    assert {tritonserver.ACTIVE, tritonserver.QUEUED, tritonserver.OPEN, tritonserver.UNLOADING} <= names


@pytest.mark.parametrize("held, problem, code, outcome", [
    (["generate"], None, 1, 0), ([], None, 0, 0), (["generate"], None, 0, 0),
    ([], None, 1, "exit code 1)"), (["generate"], None, None, "exit code None)"),
    (["generate"], "the request to unload generate failed (refused)", 1, "exit code 1; the request to unload")])
def test_a_stop_is_clean_when_only_a_held_model_kept_tritonserver_from_exiting_0(held, problem, code, outcome):
    from types import SimpleNamespace

    from models.errors import ToolkitError
    from runtime.serving.service import stop_outcome

    notes: list[str] = []
    server = SimpleNamespace(held=held, stop_problem=problem, log_path="/tmp/t.log")
    if isinstance(outcome, int):
        assert stop_outcome(server, code, notes.append) == outcome
    else:
        with pytest.raises(ToolkitError, match=r"^tritonserver did not stop cleanly \(" + re.escape(outcome)):
            stop_outcome(server, code, notes.append)
    assert notes == (["serve: note: tritonserver kept generate loaded after every request to it had ended (seen after "
                      "clients cancel gRPC streams: a race in Triton 2.51, see docs/serving.md); the server was "
                      "stopped anyway"] if held else [])
