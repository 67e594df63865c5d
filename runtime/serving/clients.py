"""Streaming clients of `generate`: gRPC through tritonclient, HTTP through Triton's generate_stream
(server-sent events), and `serve`'s OpenAI-compatible /v1/completions (server-sent events). Each
returns the tokens with their arrival times, or the server's error."""
from __future__ import annotations

import http.client
import json
import queue
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from .metrics import prometheus_sums
from .requests import GENERATE, INPUTS
from .tritonserver import error_text

NUMPY_TYPES = {"TYPE_STRING": np.object_, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32,
               "TYPE_BOOL": np.bool_}


@dataclass
class StreamResult:
    """One request's stream as the client saw it. A response may carry several tokens (a server
    that is behind sends a stream's pending tokens together): they share its arrival time."""

    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival of each token (perf_counter)
    started: float = 0.0
    error: str | None = None
    response_times: list[float] = field(default_factory=list)  # arrival of each response with tokens
    response_sizes: list[int] = field(default_factory=list)  # tokens it carried

    def add(self, tokens: list[int], arrived: float) -> None:
        """Record one response's tokens."""
        if tokens:
            self.tokens.extend(tokens)
            self.times.extend([arrived] * len(tokens))
            self.response_times.append(arrived)
            self.response_sizes.append(len(tokens))

    @property
    def ttft(self) -> float | None:
        return self.times[0] - self.started if self.times else None

    @property
    def itl(self) -> list[float]:
        """Per token, the time since the token before it (0 within one response)."""
        return [b - a for a, b in zip(self.times, self.times[1:])]

    @property
    def response_gaps(self) -> list[float]:
        """Time between consecutive responses."""
        return [b - a for a, b in zip(self.response_times, self.response_times[1:])]


def token_ids_of(value) -> list[int]:
    """The token ids of one response's `token_id` output: a scalar, a list or an array of any length."""
    return [int(token) for token in np.asarray(value).reshape(-1)]


def split_url(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def grpc_inputs(request: dict) -> list:
    """tritonclient InferInputs from a request dict (the HTTP JSON body), typed as generate declares."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in request.items():
        dtype = INPUTS[name][0]
        array = np.array(value if isinstance(value, list) else [value], dtype=NUMPY_TYPES[dtype])
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if dtype == "TYPE_STRING"
                                       else dtype.removeprefix("TYPE_"))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class GrpcStreamer:
    """One gRPC stream (tritonclient) that carries this client's requests one after another."""

    def __init__(self, address: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(address)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((time.perf_counter(), result, error)))
        self.count = 0

    def generate(self, request: dict, timeout: float) -> StreamResult:
        inputs = grpc_inputs(request)
        self.count += 1
        result = StreamResult(started=time.perf_counter())
        self.client.async_stream_infer(GENERATE, inputs, request_id=str(self.count), enable_empty_final_response=True)
        deadline = result.started + timeout
        while True:
            try:
                arrived, response, error = self.responses.get(timeout=max(deadline - time.perf_counter(), 0.001))
            except queue.Empty:
                result.error = f"no response within {timeout:.0f} s"
                return result
            if error is not None:
                result.error = error.message() if hasattr(error, "message") else str(error)
                return result
            token = response.as_numpy("token_id")
            if token is not None:
                result.add(token_ids_of(token), arrived)
            if response.get_response().parameters["triton_final_response"].bool_param:
                return result

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def http_generate(url: str, request: dict, timeout: float, stop_after: int | None = None,
                  on_token: Callable[[int], None] | None = None) -> StreamResult:
    """POST /v2/models/generate/generate_stream and read its events (each with one or more tokens);
    `stop_after` tokens: hang up then; `on_token(count)` is called as each response arrives."""
    host, port = split_url(url, 8000)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    result = StreamResult(started=time.perf_counter())
    try:
        connection.request("POST", f"/v2/models/{GENERATE}/generate_stream", json.dumps(request),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200 and "event-stream" not in (response.getheader("Content-Type") or ""):
            result.error = f"HTTP {response.status}: {error_text(response.read())}"
            return result
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = event["error"]
                break
            result.add(token_ids_of(event["token_id"]), time.perf_counter())
            if on_token:
                on_token(len(result.tokens))
            if stop_after is not None and len(result.tokens) >= stop_after:
                break
        else:
            asked = request.get("max_new_tokens", request.get("max_tokens"))
            if result.error is None and "eos_id" not in request and asked and len(result.tokens) < asked:
                # without an eos_id the server sends every token asked for: the server went away
                result.error = f"the stream ended after {len(result.tokens)} of {asked} tokens"
    except (OSError, http.client.HTTPException, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
    return result


def openai_body(request: dict, vocab_size: int) -> dict:
    """A generate request (Triton input names) as the /v1/completions body that asks for the same
    tokens: filter_thres becomes the top_k it keeps, greedy is temperature 0, and each chunk
    carries its token ids (return_token_ids) so tokens are counted exactly."""
    from ..decoding.settings import GenerationSettings, kept_count

    defaults = GenerationSettings()
    temperature = request.get("temperature", defaults.temperature)
    body = {"prompt": request["prompt_ids"], "max_tokens": request["max_new_tokens"], "seed": request.get("seed", 0),
            "temperature": max(temperature, 0.0), "stream": True, "return_token_ids": True}
    if temperature > 0:
        body["top_k"] = kept_count(request.get("filter_thres", defaults.filter_thres), vocab_size)
    return body


def openai_generate(url: str, body: dict, timeout: float, api_key: str | None = None) -> StreamResult:
    """POST /v1/completions (streaming) and read its events until `data: [DONE]`."""
    host, port = split_url(url, 8003)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    result = StreamResult(started=time.perf_counter())
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), headers)
        response = connection.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {error_text(response.read())}"
            return result
        for line in response:
            if line.startswith(b"data: [DONE]"):
                return result
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = event["error"].get("message", str(event["error"]))
                return result
            for choice in event.get("choices", []):
                result.add(choice.get("token_ids", []), time.perf_counter())
        result.error = "the stream ended without data: [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
    return result


def get_json(url: str, path: str, timeout: float = 10.0) -> dict:
    """GET `path` from Triton's HTTP endpoint as JSON (the standard library only)."""
    host, port = split_url(url, 8000)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"HTTP {response.status} for {path}: {error_text(body)}")
        return json.loads(body)
    finally:
        connection.close()


STEP_COUNTERS = ("rotary_generate_steps_total", "rotary_generate_step_rows_total", "rotary_generate_step_seconds_total")
ADMIT_COUNTERS = ("rotary_generate_admit_steps_total", "rotary_generate_admit_step_seconds_total")  # servers since 91f6ec3


def read_step_counters(metrics_url: str, timeout: float = 10.0) -> dict[str, float] | None:
    """The generate model's decode-step counters from Triton's Prometheus /metrics (the admission
    counters too where the server has them), or None when the server does not publish them."""
    host, port = split_url(metrics_url, 8002)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    values = prometheus_sums(text, STEP_COUNTERS + ADMIT_COUNTERS)
    return values if all(name in values for name in STEP_COUNTERS) else None
