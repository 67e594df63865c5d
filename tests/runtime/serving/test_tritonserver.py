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
    server.held = []
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


def busy(rows: int, queued: int = 0, unloading: int = 0) -> str:
    """Triton's /metrics text with generate's gauges over two instances (on the second: rows,
    queued requests and whether it is being unloaded)."""
    gauges = {"active_rows": rows, "queue_length": queued, "unloading": unloading}
    return "".join(f'# HELP rotary_generate_{name} ...\n'
                   f'rotary_generate_{name}{{instance="generate_0_0",model="generate"}} 0\n'
                   f'rotary_generate_{name}{{instance="generate_0_1",model="generate"}} {value}\n'
                   for name, value in gauges.items()) + 'nv_inference_count{model="generate",version="1"} 12\n'


def test_an_unload_that_gets_no_answer_at_first_is_asked_again_and_a_slow_index_is_polled_again(monkeypatch):
    server, asked = _server(monkeypatch, {UNLOAD: [TimeoutError("timed out"), urllib.error.URLError("refused"), {}],
                                          INDEX: [TimeoutError("timed out"), [{"name": "generate", "state": "UNLOADING"}],
                                                  [{"name": "generate", "state": "UNAVAILABLE"}]]})
    assert server.unload("generate") and server.stop_problem is None and server.held == []
    assert asked == [UNLOAD] * 3 + [INDEX, METRICS] * 2 + [INDEX]  # no decode process was stopped


def test_an_unload_triton_refuses_or_never_answers_is_reported(monkeypatch):
    refusal = urllib.error.HTTPError(UNLOAD, 400, "Bad Request", None, None)
    server, asked = _server(monkeypatch, {UNLOAD: [refusal]})
    assert not server.unload("generate") and asked == [UNLOAD]
    assert server.stop_problem.startswith("the request to unload generate failed (HTTP Error 400")
    monkeypatch.setattr(tritonserver, "UNLOAD_REQUEST_S", 0.0)
    server, asked = _server(monkeypatch, {UNLOAD: [urllib.error.URLError("refused")]})
    assert not server.unload("generate") and asked == [UNLOAD]
    assert server.stop_problem == "the request to unload generate failed (<urlopen error refused>)"


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
    decoding, nothing queued and no instance unloading for HELD_S, serve stops waiting, and no
    decode process is signalled."""
    monkeypatch.setattr(tritonserver, "HELD_S", 0.05)
    server, asked = _server(monkeypatch, {UNLOAD: [{}], INDEX: [UNLOADING],
                                          METRICS: [busy(2), busy(0, queued=1), busy(0)]})
    assert server.unload("generate")
    assert server.held == ["generate"] and server.stop_problem is None
    assert "signal 42" not in asked and asked.count(METRICS) >= 3


@pytest.mark.parametrize("metrics", [[busy(1)], [busy(0, queued=2)], [busy(0, unloading=1)],
                                     [urllib.error.URLError("refused")], ["# no gauges\n"],
                                     [busy(0).replace("rotary_generate_unloading", "other")]])
def test_a_model_in_use_being_unloaded_or_unknown_is_not_taken_as_held(monkeypatch, metrics):
    """Rows or queued requests, an instance whose finalize has begun (the unload goes its normal
    way, however long it takes), or gauges that cannot be read: serve waits, then fails what is left."""
    monkeypatch.setattr(tritonserver, "HELD_S", 0.0)
    monkeypatch.setattr(tritonserver, "DRAIN_MARGIN_S", -9.99)
    server, asked = _server(monkeypatch, {UNLOAD: [{}], INDEX: [UNLOADING], METRICS: metrics})
    server.exit_timeout = -10
    assert not server.unload("generate") and server.held == []
    assert server.stop_problem.startswith("generate was still loaded") and "signal 42" in asked


def test_the_gauges_read_for_a_held_model_are_the_ones_generate_publishes():
    from runtime.serving.triton_model import METRICS as PUBLISHED

    names = {name for name, _, _ in PUBLISHED.values()}
    assert {tritonserver.ACTIVE, tritonserver.QUEUED, tritonserver.UNLOADING} <= names


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
    assert notes == (["serve: note: tritonserver kept generate loaded with no request in flight (seen after clients "
                      "cancel gRPC streams: a race in Triton 2.51, see docs/serving.md); nothing was lost, and the "
                      "server was stopped anyway"] if held else [])
