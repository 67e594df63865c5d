"""The session's real server under a seeded request fuzz (HTTP, gRPC and the OpenAI API) and a
bounded soak (concurrent streams, disconnects and bad requests): every request ends, in tokens or
in one error sentence (never a traceback, never a hang), and afterwards no row is held and a fixed
greedy request still gets the same tokens."""
from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request

import pytest

from triton_process import SERVER_LIMITS
from runtime.serving.clients import GrpcStreamer, http_generate

CASES = 60  # per protocol
TIMEOUT_S = 60.0
FIXED = {"prompt_ids": [72, 101, 108, 108, 111], "max_new_tokens": 12}

INTEGERS = [0, 1, 3, -1, 2**31, 2**32 + 8, 2**62, "7", 1.5, None]
FLOATS = [0.0, 0.7, 1.0, 1.5, -0.5, 2.0, 1e30, "hot", None]


def fuzzed_request(rng: random.Random) -> dict:
    """A request with each field either absent, valid, out of range or of a wrong type."""
    request = {}
    prompt = rng.choice(["ids", "ids", "text", "none", "both", "junk"])
    if prompt in ("ids", "both"):
        request["prompt_ids"] = rng.choice([[rng.randrange(256) for _ in range(rng.randint(1, 12))], [],
                                            [300], [-2], [1] * (SERVER_LIMITS["max_prompt_tokens"] + 1)])
    if prompt in ("text", "both"):
        request["prompt"] = rng.choice(["Hi", "", "é€😀", "x" * 40])
    if prompt == "junk":
        request["prompt_ids"] = rng.choice(["abc", 3.5, [[1, 2]], {"a": 1}])
    for name, values in (("max_new_tokens", INTEGERS), ("temperature", FLOATS), ("filter_thres", FLOATS),
                         ("top_k", INTEGERS), ("top_p", FLOATS), ("seed", INTEGERS), ("eos_id", INTEGERS)):
        value = rng.choice(values)
        if value is not None and rng.random() < 0.5:
            request[name] = value
    if isinstance(request.get("max_new_tokens"), int) and request["max_new_tokens"] > 8:
        request["max_new_tokens"] = rng.choice([request["max_new_tokens"], 8])  # keep the valid ones short
    if rng.random() < 0.1:
        request["no_such_field"] = 1
    return request


def openai_body(request: dict) -> dict:
    """The fuzzed request in the OpenAI API's names (values untouched: they are the fuzz)."""
    names = {"prompt_ids": "prompt", "prompt": "prompt", "max_new_tokens": "max_tokens", "temperature": "temperature",
             "top_k": "top_k", "top_p": "top_p", "seed": "seed", "no_such_field": "n"}
    return {names[k]: v for k, v in request.items() if k in names} | {"stream": True}


def post_openai(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def one_sentence(message: str) -> bool:
    return bool(message) and "Traceback" not in message and "internal error" not in message.lower()


def fixed_tokens(server) -> list[int]:
    result = http_generate(server.url, FIXED, TIMEOUT_S)
    assert result.error is None, result.error
    return result.tokens


def test_a_seeded_fuzz_over_every_protocol_ends_every_request_cleanly(triton_server):
    before = fixed_tokens(triton_server)
    rng = random.Random(2026)
    outcomes = {"http": [0, 0], "grpc": [0, 0], "openai": [0, 0]}  # [served, refused]
    streamer = GrpcStreamer(triton_server.grpc_url)
    started = time.monotonic()
    try:
        for _ in range(CASES):
            request = fuzzed_request(rng)
            result = http_generate(triton_server.url, request, TIMEOUT_S)
            assert result.error is None or one_sentence(result.error), (request, result.error)
            outcomes["http"][result.error is not None] += 1
            try:
                result = streamer.generate(request, TIMEOUT_S)
            except Exception as error:  # a value tritonclient itself cannot encode as the declared type
                assert type(error).__name__ in ("ValueError", "TypeError", "OverflowError", "KeyError"), error
                outcomes["grpc"][1] += 1
            else:
                assert result.error is None or one_sentence(result.error), (request, result.error)
                assert "no response within" not in (result.error or ""), request
                outcomes["grpc"][result.error is not None] += 1
            status, text = post_openai(triton_server.openai_url, openai_body(request))
            assert status in (200, 400, 404, 413, 422, 429), (status, text)
            if status != 200:
                assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}, text
            else:
                assert text.rstrip().endswith("data: [DONE]"), text[-300:]
            outcomes["openai"][status != 200] += 1
    finally:
        streamer.close()
    assert all(served > 3 and refused > 10 for served, refused in outcomes.values()), outcomes
    assert time.monotonic() - started < 240
    assert fixed_tokens(triton_server) == before


def test_a_bounded_soak_with_disconnects_and_bad_requests_leaks_no_row(triton_server):
    from test_server import wait_for

    before = fixed_tokens(triton_server)
    rng = random.Random(7)
    plan = [rng.choice(["stream", "stream", "disconnect", "bad"]) for _ in range(48)]
    errors: list[str] = []
    cursor, lock = iter(enumerate(plan)), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            index, kind = item
            request = {"prompt_ids": [index % 256, 1, 2], "max_new_tokens": 40, "seed": index,
                       "temperature": 0.8 if index % 2 else 0.0}
            if kind == "bad":
                request["max_new_tokens"] = 10**6
            result = http_generate(triton_server.url, request, TIMEOUT_S, stop_after=5 if kind == "disconnect" else None)
            if kind == "stream" and (result.error or len(result.tokens) != 40):
                errors.append(f"{index}: {result.error} {len(result.tokens)}")
            if kind == "bad" and not (result.error and one_sentence(result.error)):
                errors.append(f"{index}: bad request not refused: {result.error}")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 4)
    assert not any(thread.is_alive() for thread in threads) and not errors, errors
    wait_for(lambda: triton_server.metric("rotary_generate_active_rows") == 0, "no active rows")
    assert triton_server.metric("rotary_generate_queue_length") == 0
    assert fixed_tokens(triton_server) == before
