"""The OpenAI-compatible front end against the session's real server, through the official
`openai` client: the same tokens as offline `generate`, stop strings, usage, and every refusal in
OpenAI's error shape with its status."""
from __future__ import annotations

import json

import openai
import pytest

from runtime.decoding.settings import GenerationSettings
from runtime.decoding.text import decode_bytes, encode_text

MODEL = "rotary"
PROMPT = "The rotary model "


@pytest.fixture(scope="module")
def api(triton_server):
    from fastapi.testclient import TestClient

    from runtime.serving.openai_api import create_app

    app = create_app(triton_server.grpc_url, MODEL, 256, 4096, api_key="sekrit")
    with TestClient(app) as http:
        yield http


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="sekrit", http_client=api, max_retries=0)


def expected_text(offline_tokens, serving_graph, max_tokens, temperature=0.0, seed=0, top_k=0, top_p=1.0):
    settings = GenerationSettings(max_tokens, temperature, 0.0, seed, None, top_k, top_p)
    return decode_bytes(offline_tokens(serving_graph, encode_text(PROMPT, 256), settings))


def test_models_lists_the_served_model(client):
    assert [(m.id, m.context_length) for m in client.models.list().data] == [(MODEL, 4096)]


def test_a_greedy_completion_is_offline_generates_text(client, offline_tokens, serving_graph):
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert result.choices[0].text == expected_text(offline_tokens, serving_graph, 12)
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(PROMPT.encode()), 12)


def test_a_seeded_stream_with_top_k_and_top_p_joins_to_offline_text(client, offline_tokens, serving_graph):
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.9, seed=7,
                                       top_p=0.9, stream=True, stream_options={"include_usage": True},
                                       extra_body={"top_k": 20})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text(offline_tokens, serving_graph, 20, 0.9, 7, 20, 0.9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_a_stop_string_ends_the_completion_before_it(client, offline_tokens, serving_graph):
    full = expected_text(offline_tokens, serving_graph, 24)
    stop = full[9:12]
    assert stop and full.index(stop) == 9, "pick another stop: the case lost its point"
    for streamed in (False, True):
        result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                           stream=streamed)
        chunks = list(result) if streamed else [result]
        assert "".join(c.choices[0].text for c in chunks) == full[:9]
        assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, param, words", [
    ({"prompt": "hi", "n": 2}, 400, "n", "n is not supported"),
    ({"prompt": "hi", "logprobs": 1}, 400, "logprobs", "logprobs is not supported"),
    ({"prompt": "hi", "echo": True}, 400, "echo", "echo is not supported"),
    ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty is not supported"),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix", "suffix is not supported"),
    ({"prompt": "hi", "model": "gpt-x"}, 404, "model", "the model 'gpt-x' does not exist"),
    ({"prompt": "", "max_tokens": 2}, 400, "prompt", "the prompt is empty"),
    ({"prompt": [1, 999]}, 400, "prompt", "prompt token ids must be in 0..255"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature", "temperature must be between 0.0 and 2.0"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be at least 1"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop must be a string or a list of up to 4"),
    ({"prompt": "x" * 5000, "max_tokens": 2}, 413, "prompt", "over this server's limit"),
    ({"prompt": "hi", "seed": 1 << 64}, 400, "seed", "seed must fit in 64 bits"),
    ({"prompt": "hi", "max_tokens": 10 ** 23}, 400, "max_tokens", "max_tokens must fit in 64 bits"),
    ({"prompt": "hi", "temperature": float("nan")}, 400, "temperature", "temperature must be a finite number"),
    ({"prompt": "\ud800"}, 400, "prompt", "the prompt is not valid Unicode text"),
    ({"prompt": "hi", "max_tokens": 10 ** 400}, 400, "max_tokens", "must fit in 64 bits, got a 401-digit number"),
    ({"prompt": "hi", "temperature": 10 ** 400}, 400, "temperature", "must be a finite number, got a 401-digit number"),
    ({"prompt": "hi", "top_p": 1e-50}, 400, "top_p", "top_p must be in (0, 1], got 1e-50"),
])
def test_refusals_come_in_openais_shape_with_their_status(api, body, status, param, words):
    # json.dumps writes NaN and escapes a lone surrogate, as clients other than httpx send them
    response = api.post("/v1/completions", content=json.dumps({"model": MODEL, **body}),
                        headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param and set(error) == {"message", "type", "param", "code"}


def test_one_model_is_retrieved_and_an_oversized_body_is_refused_as_it_arrives(api, client):
    assert client.models.retrieve(MODEL).id == MODEL
    missing = api.get("/v1/models/gpt-x", headers={"Authorization": "Bearer sekrit"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    big = api.post("/v1/completions", content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}',
                   headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
    assert big.status_code == 413 and "the request body is over 4 MiB" in big.json()["error"]["message"]


def test_an_unexpected_failure_is_a_500_in_openais_shape(monkeypatch):
    from fastapi.testclient import TestClient

    from runtime.serving import openai_api

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(openai_api.Completion, "parse", broken)
    with TestClient(openai_api.create_app("127.0.0.1:1", MODEL, 256, 4096), raise_server_exceptions=False) as http:
        response = http.post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 500
    assert response.json()["error"]["message"].startswith("the server failed unexpectedly (RuntimeError)")


@pytest.mark.parametrize("groups", [[[104, 101, 108, 108, 111, 33]], [[104], [101], [108], [108], [111], [33]],
                                    [[104, 101], [108, 108, 111, 33]]], ids=["one", "each", "two"])
def test_a_stop_strings_tokens_end_at_the_one_that_completed_it_however_they_arrive(groups):
    """"hello!" with stop "ll": text "he", and 4 tokens (up to the second l), whether the tokens came
    in one response, one each, or in two."""
    import asyncio

    from runtime.serving import openai_api

    class Stream:
        cancelled = finished = False

        async def tokens(self):
            for group in groups:
                yield group

        def cancel(self):
            self.cancelled = True

        def finish(self):
            self.finished = True

    completion = openai_api.Completion.parse({"prompt": "hi", "max_tokens": 6, "stop": "ll", "return_token_ids": True},
                                             MODEL, 256)

    async def run():
        return [chunk async for chunk in openai_api._run(completion, Stream())]

    chunks = asyncio.run(run())
    assert "".join(text for text, *_ in chunks) == "he" and chunks[-1][1] == "stop"
    assert chunks[-1][2] == 4 and [t for *_, tokens in chunks for t in tokens] == [104, 101, 108, 108]


def test_a_stream_cut_at_shutdown_is_a_server_error_to_retry():
    from runtime.serving.decode_loop import SHUTDOWN
    from runtime.serving.openai_api import triton_error

    error = triton_error(SHUTDOWN)
    assert (error.status, error.kind, error.code) == (503, "server_error", "unavailable")


def test_chat_says_to_use_completions_and_a_wrong_key_is_401(api):
    chat = api.post("/v1/chat/completions", json={"model": MODEL, "messages": []},
                    headers={"Authorization": "Bearer sekrit"})
    assert chat.status_code == 400 and "use /v1/completions" in chat.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = api.get("/v1/models", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_serve_starts_the_api_on_its_own_port(triton_server, offline_tokens, serving_graph):
    """`serve` runs the same app with uvicorn on --openai-port (loopback, so no key is needed)."""
    served = openai.OpenAI(base_url=triton_server.openai_url, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in served.models.list().data] == ["rotary"]
    stream = served.completions.create(model="rotary", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected_text(offline_tokens, serving_graph, 10)


def test_loadtests_openai_requests_get_the_grpc_streams_tokens(triton_server):
    """loadtest --protocol openai sends each seeded request as /v1/completions (filter_thres as the
    top_k it keeps, greedy as temperature 0) and counts tokens from return_token_ids: the same
    tokens, request by request, as the gRPC stream gives."""
    from runtime.serving.clients import GrpcStreamer
    from runtime.serving.loadtest import OpenAIClient, Workload

    requests = Workload(6, 256, 12, 10, seed=3).build()
    assert {"temperature" in r for r in requests} == {True, False}, "the workload lost its greedy/sampled mix"
    grpc, api = GrpcStreamer(triton_server.grpc_url), OpenAIClient(triton_server.openai_url.removesuffix("/v1"), 256)
    try:
        for request in requests:
            expected, got = grpc.generate(request, 60), api.generate(request, 60)
            assert expected.error is None and got.error is None, (expected.error, got.error)
            assert got.tokens == expected.tokens and len(got.tokens) == request["max_new_tokens"]
            assert sum(got.response_sizes) == len(got.tokens)
    finally:
        grpc.close()


def test_token_ids_are_returned_only_when_asked(api):
    headers = {"Authorization": "Bearer sekrit"}
    plain = api.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, headers=headers)
    asked = api.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0,
                                              "return_token_ids": True}, headers=headers)
    assert "token_ids" not in plain.json()["choices"][0]
    ids = asked.json()["choices"][0]["token_ids"]
    assert len(ids) == 3 and asked.json()["choices"][0]["text"] == decode_bytes(ids)
    refused = api.post("/v1/completions", json={"prompt": "hi", "return_token_ids": "yes"}, headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "return_token_ids"


def test_a_stop_string_cancels_the_generate_request_with_its_key_not_by_cancelling_the_stream(
        client, triton_server, offline_tokens, serving_graph):
    """The completion asks for 16000 tokens and stops at a string in its first ten: the front end
    sends a cancel request with the completion's key (the bundled Triton races when a gRPC stream is
    cancelled), so the server ends the request as cancelled long before its 16000th token."""
    from test_server import wait_for

    from runtime.serving.metrics import PUBLISH_S

    def outcome(name):
        return triton_server.metric("rotary_generate_requests_total", outcome=name)

    import time

    def triton_requests():  # Triton's own count: the cancel request is a request of its own
        return triton_server.metric("nv_inference_request_success", model="generate")

    time.sleep(2 * PUBLISH_S)  # earlier requests' counts settle
    cancelled, tokens_before = outcome("cancelled"), triton_server.metric("rotary_generate_tokens_total")
    requests_before = triton_requests()
    stop = expected_text(offline_tokens, serving_graph, 24)[9:12]
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16000, temperature=0, stop=[stop])
    assert result.choices[0].finish_reason == "stop"
    wait_for(lambda: outcome("cancelled") == cancelled + 1, "the generate request to end cancelled", 60)
    assert triton_server.metric("rotary_generate_tokens_total") - tokens_before < 16000
    wait_for(lambda: triton_requests() == requests_before + 2, "the completion's request and its cancel request", 60)


def test_ending_a_completion_early_sends_a_cancel_request_and_reads_the_stream_to_its_end(monkeypatch):
    """The front end's stream against a fake tritonclient: a stop (cancel()) sends a request holding
    only the completion's key on the same stream, closes the request side, and its reader reads
    what is left; the RPC is cancelled only when that takes longer than DRAIN_S. A handler
    cancelled mid-read (its client gone) does not cancel the read."""
    import asyncio

    import numpy as np

    from runtime.serving import openai_api

    class Result:
        def as_numpy(self, name):
            return np.array([7])

    class Call:
        def __init__(self, requests, ends):
            self.requests, self.sent, self.ends = requests, [], ends
            self.cancelled, self.finished, self.stop = False, False, asyncio.Event()

        def __aiter__(self):
            return self

        async def __anext__(self):
            if not self.sent:
                self.sent.append(await self.requests.__anext__())
                return Result(), None
            try:
                self.sent.append(await self.requests.__anext__())  # the cancel request, then the end
                await self.requests.__anext__()
            except StopAsyncIteration:
                pass
            if not self.ends:
                await self.stop.wait()  # a server that never ends the stream, until the RPC is cancelled
                raise asyncio.CancelledError
            self.finished = True
            raise StopAsyncIteration

        def cancel(self):
            self.cancelled = not self.finished
            self.stop.set()

    class Client:
        def __init__(self, ends):
            self.ends, self.call = ends, None

        def stream_infer(self, requests):
            self.call = Call(requests, self.ends)
            return self.call

    async def stop_after_first_token(client, gone: bool):
        stream = openai_api.TritonStream(client, {"prompt_ids": [1], "max_new_tokens": 50}, "cmpl-1")
        tokens = stream.tokens()
        await tokens.__anext__()
        if gone:  # the handler is cancelled while it waits for the next tokens
            waiting = asyncio.ensure_future(tokens.__anext__())
            await asyncio.sleep(0)
            waiting.cancel()
        stream.cancel()
        await asyncio.gather(*openai_api._READERS, return_exceptions=True)
        await asyncio.sleep(0.3)  # past DRAIN_S
        return stream

    monkeypatch.setattr(openai_api, "DRAIN_S", 0.2)
    for ends, gone in ((True, False), (True, True), (False, False)):
        client = Client(ends)
        stream = asyncio.run(stop_after_first_token(client, gone))
        first, cancel = client.call.sent
        assert [i.name() for i in first["inputs"]] == ["prompt_ids", "max_new_tokens", "cancel_key"]
        assert [i.name() for i in cancel["inputs"]] == ["cancel_key"] and cancel["request_id"] == "cmpl-1-cancel"
        assert stream.key.encode() in cancel["inputs"][0]._get_content() and len(stream.key) == 32
        assert client.call.finished is ends and client.call.cancelled is (not ends)
