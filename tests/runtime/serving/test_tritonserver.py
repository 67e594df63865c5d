"""TritonServer's graceful stop against a fake HTTP layer: a slow answer is asked again, a refusal is not."""
from __future__ import annotations

import io
import json
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
    server.endpoints = type("Endpoints", (), {"url": "http://127.0.0.1:1"})()
    asked: list[str] = []

    def urlopen(request, timeout):
        path = request.full_url.removeprefix("http://127.0.0.1:1")
        asked.append(path)
        queue = answers[path]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return io.BytesIO(json.dumps(answer).encode())

    monkeypatch.setattr(tritonserver.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(tritonserver, "POLL_S", 0.0)
    monkeypatch.setattr(tritonserver, "processes_below", lambda pid, depth: {42: "decode"} if depth == 2 else {})
    monkeypatch.setattr(tritonserver, "_signal", lambda pid, number: asked.append(f"signal {pid}"))
    return server, asked


UNLOAD, INDEX = "/v2/repository/models/generate/unload", "/v2/repository/index"


def test_an_unload_that_gets_no_answer_at_first_is_asked_again_and_a_slow_index_is_polled_again(monkeypatch):
    server, asked = _server(monkeypatch, {UNLOAD: [TimeoutError("timed out"), urllib.error.URLError("refused"), {}],
                                          INDEX: [TimeoutError("timed out"), [{"name": "generate", "state": "UNLOADING"}],
                                                  [{"name": "generate", "state": "UNAVAILABLE"}]]})
    assert server.unload("generate") and server.stop_problem is None
    assert asked == [UNLOAD] * 3 + [INDEX] * 3  # within the drain: no decode process was stopped


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
