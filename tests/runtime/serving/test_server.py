"""Against the real server (`serve` on 127.0.0.1, tritonserver bundled with nvidia-pytriton, the
python backend running the toolkit's scheduler over ONNX Runtime CPU): streamed tokens equal offline
`generate`, bad requests get one error response while serving goes on, a client that hangs up frees
its row, health and metrics answer."""
from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest

from serving_helpers import mixed_requests
from runtime.decoding.text import encode_text
from runtime.serving.metrics import PUBLISH_S
from runtime.serving.clients import GrpcStreamer, grpc_inputs, http_generate

TIMEOUT_S = 60  # per request; every wait below is bounded


def as_request(prompt: list[int], settings, text: str | None = None) -> dict:
    request = {"prompt": text} if text is not None else {"prompt_ids": prompt}
    request.update(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                   filter_thres=settings.filter_thres, seed=settings.seed)
    if settings.eos_id is not None:
        request["eos_id"] = settings.eos_id
    return request


@pytest.fixture(scope="module")
def workload():
    """16 clients x 4 requests: mixed prompts (ids and text), lengths and settings."""
    work = mixed_requests(64, seed=5, max_prompt=40, max_new=48)
    texts = {index: "Hello, Triton! " * (1 + index % 3) for index in range(0, 64, 5)}
    return [(encode_text(texts[i], 256) if i in texts else prompt, settings, texts.get(i))
            for i, (prompt, settings) in enumerate(work)]


def test_sixteen_streaming_clients_get_offline_generate_tokens(triton_server, workload, offline_tokens,
                                                                serving_graph):
    results = [None] * len(workload)

    def client(index: int) -> None:  # even clients stream over gRPC, odd ones over HTTP
        mine = range(index, len(workload), 16)
        if index % 2 == 0:
            streamer = GrpcStreamer(triton_server.grpc_url)
            try:
                for i in mine:
                    results[i] = streamer.generate(as_request(*workload[i]), TIMEOUT_S)
            finally:
                streamer.close()
        else:
            for i in mine:
                results[i] = http_generate(triton_server.url, as_request(*workload[i]), TIMEOUT_S)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 4)
    assert all(result is not None for result in results), "a client did not finish"
    assert [r.error for r in results if r.error] == []
    for index, ((prompt, settings, _), result) in enumerate(zip(workload, results)):
        assert result.tokens == offline_tokens(serving_graph, prompt, settings), f"request {index}"
    assert triton_server.metric("rotary_generate_requests_total", outcome="failed") == 0


MALFORMED = [
    ({"prompt_ids": [1, 999]}, "prompt_ids holds 999, outside the vocabulary 0..255"),
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt_ids": []}, "prompt_ids is empty"),
    ({"prompt_ids": [1], "max_new_tokens": 401}, "max_new_tokens must be between 1 and this server's limit of 400"),
    ({"prompt_ids": list(range(49))}, "the prompt has 49 tokens, over this server's limit of 48"),
    ({"prompt_ids": [1], "max_new_tokens": "many"}, "Unable to parse"),  # wrong type: Triton's own check
    ({"prompt_ids": [1], "temperature": [1.0, 2.0]}, "can not convert input 'temperature'"),  # Triton: dims [1]
    ({"max_new_tokens": 3}, "give exactly one of prompt (text) or prompt_ids"),
    ({"prompt": "a", "prompt_ids": [1]}, "give exactly one of prompt"),
    ({"prompt_ids": [1], "eos_id": -3}, "eos_id -3 is outside the vocabulary"),
]


@pytest.mark.parametrize("body, message", MALFORMED, ids=[m[:30] for _, m in MALFORMED])
def test_a_malformed_request_gets_an_error_and_the_next_valid_one_is_served(triton_server, body, message):
    bad = http_generate(triton_server.url, body, TIMEOUT_S)
    assert bad.tokens == [] and message in bad.error and "Traceback" not in bad.error
    good = http_generate(triton_server.url, {"prompt_ids": [72, 105], "max_new_tokens": 3}, TIMEOUT_S)
    assert good.error is None and len(good.tokens) == 3


def test_garbage_json_and_wrong_grpc_types_are_refused_and_serving_goes_on(triton_server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", triton_server.http, timeout=TIMEOUT_S)
    connection.request("POST", "/v2/models/generate/generate_stream", b'{"prompt_ids": [1, 2', {})
    response = connection.getresponse()
    assert response.status >= 400 and b"error" in response.read()
    connection.close()

    import tritonclient.grpc as grpcclient

    streamer = GrpcStreamer(triton_server.grpc_url)
    try:
        wrong = grpcclient.InferInput("prompt_ids", [2], "INT32")
        wrong.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
        streamer.client.async_stream_infer("generate", [wrong], request_id="wrong", enable_empty_final_response=True)
        _, _, error = streamer.responses.get(timeout=TIMEOUT_S)
        assert error is not None and "INT32" in str(error)
        good = streamer.generate({"prompt_ids": [3, 4], "max_new_tokens": 2}, TIMEOUT_S)
        assert good.error is None and len(good.tokens) == 2
    finally:
        streamer.close()


def wait_for(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_client_that_disconnects_mid_stream_frees_its_row(triton_server, protocol):
    """The tiny model can stream all 400 tokens before a cancellation reaches the server (seen once
    in a CI-like run on 2 busy cores), so up to three tries, each ending one way or the other;
    one must end as cancelled."""
    def outcomes():
        return tuple(triton_server.metric("rotary_generate_requests_total", outcome=o) for o in ("cancelled", "completed"))

    long_stream = {"prompt_ids": [9, 8, 7], "max_new_tokens": 400}
    for _ in range(3):
        time.sleep(2 * PUBLISH_S)  # the server publishes its metrics every PUBLISH_S: let earlier requests' settle
        cancelled, completed = outcomes()
        if protocol == "http":
            partial = http_generate(triton_server.url, long_stream, TIMEOUT_S, stop_after=2)  # then hangs up
            assert partial.error is None and len(partial.tokens) == 2
        else:
            streamer = GrpcStreamer(triton_server.grpc_url)
            streamer.client.async_stream_infer("generate", grpc_inputs(long_stream), request_id="gone")
            assert streamer.responses.get(timeout=TIMEOUT_S)[2] is None  # the first token came
            streamer.close(cancel=True)
        wait_for(lambda: sum(outcomes()) == cancelled + completed + 1, "the request to end")
        wait_for(lambda: triton_server.metric("rotary_generate_active_rows") == 0, "no active rows")
        if outcomes() == (cancelled + 1, completed):
            return
    pytest.fail("three streams whose clients hung up after the first tokens all ran to completion: "
                "cancellation never reached the scheduler")


def test_health_readiness_and_metrics_answer(triton_server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/generate/ready"):
        with urllib.request.urlopen(triton_server.url + path, timeout=5) as response:
            assert response.status == 200, path
    assert triton_server.metric("rotary_generate_tokens_total") > 0
    assert triton_server.metric("rotary_generate_queue_length") == 0
    assert triton_server.metric("nv_inference_request_success", model="generate") > 0  # Triton's own
    wait_for(lambda: triton_server.metric("rotary_generate_tokens_per_second") >= 0, "tokens/s")


def test_the_repository_api_is_closed_to_clients(triton_server):
    request = urllib.request.Request(triton_server.url + "/v2/repository/models/generate/unload", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 403
