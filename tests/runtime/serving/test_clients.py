"""The streaming clients and loadtest's figures with responses that carry several tokens."""
from __future__ import annotations

import http.server
import json
import threading

import pytest

from runtime.serving.clients import StreamResult, http_generate, token_ids_of
from runtime.serving.loadtest import summarize

EVENTS = [{"token_id": 7}, {"token_id": [8, 9, 10]}, {"token_id": [11]}]  # scalar, three tokens, one in a list


class _Stream(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in EVENTS:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def sse_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Stream)
    thread = threading.Thread(target=server.handle_request, daemon=True)  # exactly one request
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    thread.join(10)
    server.server_close()


def test_http_client_reads_responses_of_several_tokens(sse_server):
    counts = []
    result = http_generate(sse_server, {"prompt_ids": [1]}, 10.0, on_token=counts.append)
    assert result.error is None
    assert result.tokens == [7, 8, 9, 10, 11] and result.response_sizes == [1, 3, 1]
    assert counts == [1, 4, 5]  # once per response, with the tokens so far
    assert result.times[1] == result.times[2] == result.times[3] == result.response_times[1]
    assert result.itl[1:3] == [0.0, 0.0] and len(result.response_gaps) == 2


def test_token_ids_of_any_shape():
    import numpy as np

    assert token_ids_of(5) == [5] and token_ids_of([5, 6]) == [5, 6]
    assert token_ids_of(np.array([[1], [2]], dtype=np.int64)) == [1, 2]


def test_summary_counts_tokens_per_response_and_time_between_responses():
    a, b = StreamResult(started=0.0), StreamResult(started=1.0)
    a.add([1], 0.010)
    a.add([2, 3, 4], 0.030)  # a server that fell behind sends three at once
    b.add([5], 1.005)
    b.add([6], 1.015)
    level = summarize([a, b, StreamResult(error="boom")], 2, 2.0)
    assert level["tokens"] == 6 and level["responses"] == 4 and level["errors"] == 1
    assert level["tokens_per_response"] == {"mean": 1.5, "max": 3}
    assert level["tokens_per_second"] == 3.0
    assert level["ttft_ms"]["p50"] == pytest.approx(7.5)  # 10 and 5 ms
    # per token: 20, 0, 0 (request a) and 10 (request b); between responses: 20 and 10
    assert sorted(a.itl + b.itl) == pytest.approx([0.0, 0.0, 0.010, 0.020])
    assert level["itl_ms"]["p50"] == pytest.approx(5.0)
    assert level["response_gap_ms"]["p50"] == pytest.approx(15.0)
