"""An OpenAI-compatible front end (`/v1/models`, `/v1/completions`) for the `generate` model.

The clients people already use for LLM-style models (the `openai` package, LangChain, LiteLLM,
aiperf, guidellm) speak the OpenAI API, not Triton's KServe v2 protocol. This ASGI app (FastAPI:
request parsing, server-sent events and error handlers are its everyday work, and uvicorn serves
it) forwards each completion to Triton over one gRPC stream and adds no per-token work beyond
decoding bytes and encoding the event; Triton stays the engine that batches and decodes.

`return_token_ids: true` (vLLM's extension) adds each chunk's token ids to its choice as
`token_ids`, so a benchmark client counts tokens exactly (loadtest --protocol openai uses it).

OpenAI's completion fields it does not support are refused with a 400 naming the field, never
ignored (other servers' extensions are ignored, as vLLM does); errors always come in OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, an unexpected failure included.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime.
import asyncio
import itertools
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from ..decoding.text import TextPieces, encode_text
from .clients import grpc_inputs
from .requests import GENERATE

MAX_STOPS = 4
MAX_BODY_BYTES = 4 << 20  # a request body past this is refused before it is read whole
INT64 = (-(1 << 63), (1 << 63) - 1)  # the range of generate's integer inputs
SETTINGS_VARIABLE = "ROTARY_OPENAI_SETTINGS"  # the app's settings, for uvicorn's worker processes
# field -> the values that are supported (anything else is refused, naming the field)
UNSUPPORTED = {
    "n": lambda value: value in (None, 1),
    "best_of": lambda value: value in (None, 1),
    "logprobs": lambda value: value is None,
    "echo": lambda value: value in (None, False),
    "suffix": lambda value: value is None,
    "presence_penalty": lambda value: value in (None, 0, 0.0),
    "frequency_penalty": lambda value: value in (None, 0, 0.0),
    "logit_bias": lambda value: not value,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def triton_error(message: str) -> ApiError:
    """The generate model's one-sentence refusals, with the status an OpenAI client expects."""
    if "the server is busy" in message:
        return ApiError(429, message, code="server_busy", kind="rate_limit_error")
    if "shutting down" in message or "shut down" in message or "has stopped" in message:
        return ApiError(503, message, code="unavailable", kind="server_error")
    if "prompt" in message and ("over this server's limit" in message or "capacity" in message):
        return ApiError(413, message, param="prompt", code="prompt_too_long")
    if "max_new_tokens" in message:
        return ApiError(400, message.replace("max_new_tokens", "max_tokens"), param="max_tokens")
    if "decoding failed" in message:
        return ApiError(500, message, kind="server_error")
    return ApiError(400, message)


@dataclass
class Completion:
    """A checked /v1/completions request."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool = False
    triton: dict = field(default_factory=dict)  # the generate request

    @classmethod
    def parse(cls, body: Any, model: str, vocab_size: int) -> "Completion":
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for name, supported in UNSUPPORTED.items():
            if name in body and not supported(body[name]):
                raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_field")
        if body.get("model") not in (None, model):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server serves {model!r}",
                           param="model", code="model_not_found")
        prompt = _prompt(body.get("prompt"), vocab_size)
        max_tokens = _number(body, "max_tokens", 16, int, low=1)
        temperature = _number(body, "temperature", 1.0, float, low=0.0, high=2.0)
        top_p = _number(body, "top_p", 1.0, float, low=0.0, high=1.0)
        if np.float32(top_p) == 0.0:  # generate takes FP32: a top_p that rounds to 0 is 0
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
        top_k = _number(body, "top_k", 0, int, low=-1)
        seed = _number(body, "seed", None, int)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings", param="stop")
        stream, token_ids = body.get("stream", False), body.get("return_token_ids", False)
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise ApiError(400, "stream must be true or false and stream_options an object", param="stream")
        if not isinstance(token_ids, bool):
            raise ApiError(400, "return_token_ids must be true or false", param="return_token_ids")
        seed = secrets.randbits(62) if seed is None else seed
        triton = {"prompt_ids": prompt, "max_new_tokens": max_tokens, "temperature": temperature,
                  "filter_thres": 0.0, "top_k": max(top_k, 0), "top_p": top_p, "seed": seed}
        return cls(prompt, max_tokens, temperature, top_p, max(top_k, 0), seed, stop, stream,
                   bool(options.get("include_usage")), token_ids, triton)


def _prompt(value: Any, vocab_size: int) -> list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "the prompt is empty; send at least one character", param="prompt")
        try:
            return encode_text(value, vocab_size)
        except UnicodeEncodeError:
            raise ApiError(400, "the prompt is not valid Unicode text (it holds an unpaired surrogate)",
                           param="prompt") from None
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if min(value) < 0 or max(value) >= vocab_size:
            raise ApiError(400, f"prompt token ids must be in 0..{vocab_size - 1}", param="prompt")
        return list(value)
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")


def _number(body: dict, name: str, default, kind, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=name)
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:  # also before isfinite, which overflows
        shown = value if abs(value) < 10 ** 30 else f"a {len(str(abs(value)))}-digit number"
        need = "fit in 64 bits" if kind is int else "be a finite number"
        raise ApiError(400, f"{name} must {need}, got {shown}", param=name)
    if not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"{name} must be {bounds}, got {value!r}", param=name)
    return kind(value)


class StopScanner:
    """Text as it streams, held back only as far as a stop string could still be starting."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent = stops, "", 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, piece: str) -> tuple[str, bool]:
        """(text that may go out now, whether a stop string ended the completion)."""
        self.text += piece
        hits = [self.text.find(stop, max(self.sent - self.hold, 0)) for stop in self.stops]
        hits = [hit for hit in hits if hit >= 0]
        if hits:
            end = min(hits)
            out, self.text = self.text[self.sent:end], self.text[:end]
            self.sent = end
            return out, True
        ready = max(len(self.text) - self.hold, self.sent)
        out, self.sent = self.text[self.sent:ready], ready
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


DRAIN_S = 5.0  # once our side is closed, how long the stream may take to end before its RPC is cancelled
# (a cancel request ends it in milliseconds; with several GPUs it can reach another GPU's decode
# loop, which does not hold the key, and then this is what ends the request)
_READERS: set = set()  # the streams' reader tasks (a task nobody refers to may be collected)


class TritonStream:
    """One completion's tokens from the generate model over one gRPC stream (tritonclient aio).

    Ending a completion early (a stop string, an error, a client gone) does not cancel the gRPC
    stream: the bundled Triton (2.51) races when a client cancels a stream while its last response
    is on its way, which can keep `generate` loaded or crash the server (docs/serving.md). The
    request carries a random cancel key; a cancel request holding only that key goes on the same
    stream, which then closes its side. A task of its own reads the stream to its end, so a
    completion whose client has gone (its handler cancelled) does not cancel the read, which in
    grpc.aio cancels the RPC."""

    def __init__(self, client, request: dict, request_id: str):
        self.client, self.request_id = client, request_id
        self.key = secrets.token_hex(16)
        self.request = {**request, "cancel_key": self.key}
        self._next: asyncio.Queue = asyncio.Queue()  # what the request side sends next: a request, or None to close
        self._arrived: asyncio.Queue = asyncio.Queue()  # (result, error) as they come, an exception if the
        # stream fails, then None
        self._responses = None
        self._ended = False
        self._timer = None  # cancels the RPC if the stream has not ended DRAIN_S after our side closed

    async def tokens(self) -> AsyncIterator[list[int]]:
        """Each response's token ids; an ApiError for a refusal."""
        async def requests():
            yield {"model_name": GENERATE, "inputs": grpc_inputs(self.request), "request_id": self.request_id}
            while (following := await self._next.get()) is not None:  # keep the stream open until the end
                yield following

        self._responses = self.client.stream_infer(requests())
        reader = asyncio.get_running_loop().create_task(self._read())
        _READERS.add(reader)
        reader.add_done_callback(_READERS.discard)
        expected, received = self.request["max_new_tokens"], 0
        while (arrived := await self._arrived.get()) is not None:
            if isinstance(arrived, Exception):  # the stream itself failed
                raise arrived
            result, error = arrived
            if error is not None:  # an error response is the request's last: nothing to cancel
                self.finish()
                raise triton_error(error.message() if hasattr(error, "message") else str(error))
            ids = result.as_numpy("token_id")
            if ids is None:
                continue
            tokens = [int(token) for token in np.asarray(ids).reshape(-1)]
            received += len(tokens)
            yield tokens
            if received >= expected:
                return

    async def _read(self) -> None:
        try:
            async for arrived in self._responses:
                self._arrived.put_nowait(arrived)
        except Exception as error:  # the stream failed: tokens() raises it
            self._arrived.put_nowait(error)
        finally:
            self._arrived.put_nowait(None)
            if self._timer is not None:
                self._timer.cancel()

    def finish(self) -> None:
        """The completion is over: close our side of the stream (generate has sent its last response)."""
        if not self._ended:
            self._ended = True
            self._next.put_nowait(None)
            self._arm()

    def _arm(self) -> None:
        if self._responses is not None:
            self._timer = asyncio.get_running_loop().call_later(DRAIN_S, self._responses.cancel)

    def cancel(self) -> None:
        """End the generate request early: a cancel request on the stream, then close our side; the
        reader reads what is left (the RPC itself is cancelled only if that takes over DRAIN_S)."""
        if self._ended:
            return
        self._ended = True
        self._next.put_nowait({"model_name": GENERATE, "inputs": grpc_inputs({"cancel_key": self.key}),
                               "request_id": f"{self.request_id}-cancel"})
        self._next.put_nowait(None)
        self._arm()


def create_app(grpc_url: str, model: str, vocab_size: int, context_length: int | None, api_key: str | None = None):
    """The ASGI app; `grpc_url` is Triton's gRPC address (host:port)."""
    from fastapi import FastAPI, Request

    app = FastAPI(title="rotary-deploy OpenAI-compatible API", openapi_url=None, docs_url=None, redoc_url=None)
    _install_errors_and_key(app, api_key)
    counter = itertools.count()
    state: dict = {}

    def client():
        if "client" not in state:
            import tritonclient.grpc.aio as grpcclient

            state["client"] = grpcclient.InferenceServerClient(grpc_url)
        return state["client"]

    entry = {"id": model, "object": "model", "created": 0, "owned_by": "rotary-deploy", "context_length": context_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [entry]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name != model:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model!r}", param="model",
                           code="model_not_found")
        return entry

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(400, "this model has no chat template; use /v1/completions with a text prompt",
                       code="chat_not_supported")

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await _bounded_body(request))
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        completion = Completion.parse(body, model, vocab_size)
        if context_length is not None and len(completion.prompt) >= context_length:
            raise ApiError(413, f"the prompt's {len(completion.prompt)} tokens are over this server's limit: a row "
                                f"holds {context_length} tokens, prompt and new ones; shorten the prompt",
                           param="prompt", code="prompt_too_long")
        ident = f"cmpl-{secrets.token_hex(12)}"
        return await _respond(completion, TritonStream(client(), completion.triton, f"{ident}-{next(counter)}"),
                              ident, model)

    return app


async def _bounded_body(request) -> bytes:
    """The body, refused with a 413 once it passes MAX_BODY_BYTES (declared or as it arrives)."""
    refused = ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB; send a shorter prompt",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise refused
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise refused
    return bytes(body)


def app_from_environment():
    """The app as each of uvicorn's worker processes builds it (`uvicorn --factory`), from the
    settings `serve` put in ROTARY_OPENAI_SETTINGS."""
    import os

    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    return create_app(settings["grpc_url"], settings["model"], settings["vocab_size"], settings["context_length"],
                      settings.get("api_key"))


def _install_errors_and_key(app, api_key: str | None) -> None:
    """Every error in OpenAI's shape; `/v1/*` behind `Authorization: Bearer KEY` when a key is set."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # a bug: still an answer in OpenAI's shape
        return JSONResponse(ApiError(500, f"the server failed unexpectedly ({type(error).__name__}); retry, and "
                                          "report it if it repeats", kind="server_error").body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail), code="not_found"
                                     if error.status_code == 404 else None).body(), status_code=error.status_code)

    @app.middleware("http")
    async def authorise(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                error = ApiError(401, "a valid API key is required: send Authorization: Bearer KEY",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)


async def _respond(completion: Completion, stream: "TritonStream", ident: str, model: str):
    """The completion as one JSON body, or as server-sent events ending in `data: [DONE]`."""
    from fastapi.responses import StreamingResponse

    created = int(time.time())
    chunks = _run(completion, stream)
    ids = completion.return_token_ids
    if not completion.stream:
        text, finish, produced, tokens = "", "length", 0, []
        async for piece, finish_reason, count, new in chunks:
            text, produced = text + piece, count
            tokens += new
            finish = finish_reason or finish
        return _body(ident, created, model, text, finish, completion, produced, tokens if ids else None)
    first = await chunks.__anext__()  # a refusal is an error status, not an event

    async def events():
        piece, finish, produced, tokens = first
        try:
            yield _event(ident, created, model, piece, finish, tokens if ids else None)
            async for piece, finish, produced, tokens in chunks:
                yield _event(ident, created, model, piece, finish, tokens if ids else None)
        except ApiError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
        if completion.include_usage:
            yield f"data: {json.dumps(_usage_chunk(ident, created, model, completion, produced))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _run(completion: Completion, stream: TritonStream):
    """(text piece, finish reason or None, tokens so far, the response's token ids) per response
    with text or tokens to send, the last with its reason. At a stop string the text is cut where
    it starts, and the tokens (ids and usage) end with the one that completed it, however the
    tokens were grouped into responses."""
    pieces, scanner, produced, complete = TextPieces(), StopScanner(completion.stop), 0, False
    try:
        async for tokens in stream.tokens():
            last = produced + len(tokens) >= completion.max_tokens
            out, stopped = "", False
            for i, token in enumerate(tokens):  # token by token, so a stop is placed at its token
                piece, stopped = scanner.add(pieces.piece(token, last and i == len(tokens) - 1))
                out += piece
                if stopped:
                    tokens = tokens[: i + 1]
                    break
            produced += len(tokens)
            final = produced >= completion.max_tokens
            if stopped:
                complete = final  # a stop string in the last response: nothing left to cancel
                if not final:
                    stream.cancel()
                yield out, "stop", produced, tokens
                return
            if final:
                complete = True  # the stream ended as generate ends it: nothing to cancel
                yield out + scanner.flush(), "length", produced, tokens
                return
            if out or completion.return_token_ids:
                yield out, None, produced, tokens
        raise ApiError(502, f"the generate stream ended after {produced} of {completion.max_tokens} tokens; "
                            "retry the request", kind="server_error")
    finally:
        if complete:
            stream.finish()
        else:  # a stop string, an error or a client gone: end the generate request too
            stream.cancel()


def _usage(completion: Completion, produced: int) -> dict:
    return {"prompt_tokens": len(completion.prompt), "completion_tokens": produced,
            "total_tokens": len(completion.prompt) + produced}


def _choice(text: str, finish: str | None, token_ids: list[int] | None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def _body(ident: str, created: int, model: str, text: str, finish: str, completion: Completion, produced: int,
          token_ids: list[int] | None) -> dict:
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [_choice(text, finish, token_ids)], "usage": _usage(completion, produced)}


def _event(ident: str, created: int, model: str, text: str, finish: str | None, token_ids: list[int] | None) -> str:
    chunk = {"id": ident, "object": "text_completion", "created": created, "model": model,
             "choices": [_choice(text, finish, token_ids)]}
    return f"data: {json.dumps(chunk)}\n\n"


def _usage_chunk(ident: str, created: int, model: str, completion: Completion, produced: int) -> dict:
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": _usage(completion, produced)}
