"""One `generate` request: its inputs (name -> numpy array, as Triton hands them over) checked and
turned into a typed request, or refused with one sentence naming the input and the fix."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from models.errors import ToolkitError

from ..decoding.settings import GenerationSettings
from ..decoding.text import encode_text
from .limits import Limits

# input name -> (Triton data type, dims, what it means); one of `prompt`, `prompt_ids`, `text_input`
# is required. `text_input`, `max_tokens` and `stream` are the names Triton's generate-extension
# clients send to its vLLM and TensorRT-LLM models: a request that uses `text_input` is answered
# in `text_output`.
# Integers are INT64: Triton's HTTP front end wraps a JSON number that overflows an INT32 input
# (4294967304 arrived as 8), so a 32-bit field could not be checked as the number the client sent.
GENERATE = "generate"  # the served model's name in Triton

INPUTS = {
    "prompt": ("TYPE_STRING", [1], "text prompt, byte-level tokens"),
    "prompt_ids": ("TYPE_INT64", [-1], "prompt token ids"),
    "text_input": ("TYPE_STRING", [1], "text prompt, answered in text_output (Triton's LLM convention)"),
    "max_new_tokens": ("TYPE_INT64", [1], "tokens to generate"),
    "max_tokens": ("TYPE_INT64", [1], "tokens to generate (Triton's LLM convention)"),
    "stream": ("TYPE_BOOL", [1], "false: one response with every token (default true)"),
    "temperature": ("TYPE_FP32", [1], "sampling temperature; <= 0 is greedy"),
    "filter_thres": ("TYPE_FP32", [1], "top-k filter: keep the top (1 - filter_thres) fraction of logits"),
    "top_k": ("TYPE_INT64", [1], "keep at most this many logits (0: no limit)"),
    "top_p": ("TYPE_FP32", [1], "nucleus sampling: keep the likeliest tokens up to this probability mass"),
    "seed": ("TYPE_INT64", [1], "sampling seed"),
    "eos_id": ("TYPE_INT64", [1], "stop after this token"),
    "cancel_key": ("TYPE_STRING", [1], "a random key of the client's (16-64 letters, digits, - or _); a later "
                                       "request holding only this input cancels this one, whichever stream it "
                                       "comes on, without cancelling a gRPC stream"),
}
OUTPUTS = {
    "token_id": ("TYPE_INT64", [-1], "the new tokens: one, or all a stream had pending when the server was behind"),
    "text": ("TYPE_STRING", [1], "their text: UTF-8 decoded incrementally, a multi-byte character completed "
                                 "by a later response"),
    "text_output": ("TYPE_STRING", [1], "the same text, for requests that sent text_input"),
}
DEFAULTS = GenerationSettings()


class RequestError(ToolkitError, ValueError):
    """A request the server refuses; the message goes back to the client."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: list[int]
    settings: GenerationSettings
    text: bool  # the prompt came as text
    text_output: bool = False  # answer in `text_output` (the prompt came as `text_input`)
    stream: bool = True  # False: every token in one final response
    cancel_key: str | None = None  # a later request holding only this key cancels this one


def parse_request(arrays: Mapping[str, np.ndarray], vocab_size: int, limits: Limits,
                  capacity: int | None = None) -> GenerateRequest:
    """Check every input against the model and the limits; `capacity`: tokens a row can hold."""
    unknown = sorted(set(arrays) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r}; the inputs are {', '.join(INPUTS)}")
    prompt, text, text_input = _prompt(arrays, vocab_size)
    if len(prompt) > limits.max_prompt_tokens:
        raise RequestError(f"the prompt has {len(prompt)} tokens, over this server's limit of "
                           f"{limits.max_prompt_tokens} (max_prompt_tokens); shorten it")
    if "max_new_tokens" in arrays and "max_tokens" in arrays:
        raise RequestError("give max_new_tokens or max_tokens, not both")
    length_name = "max_tokens" if "max_tokens" in arrays else "max_new_tokens"  # as the client named it
    new_tokens = _integer(arrays, length_name, limits.new_tokens_default)
    if not 1 <= new_tokens <= limits.max_new_tokens:
        raise RequestError(f"{length_name} must be between 1 and this server's limit of {limits.max_new_tokens}, "
                           f"got {new_tokens}")
    if capacity is not None and len(prompt) + new_tokens > capacity:
        raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens {new_tokens} is over the model's "
                           f"capacity of {capacity} tokens; shorten the prompt or ask for fewer tokens")
    temperature = _number(arrays, "temperature", DEFAULTS.temperature)
    filter_thres = _number(arrays, "filter_thres", DEFAULTS.filter_thres)
    if not 0.0 <= filter_thres < 1.0:
        raise RequestError(f"filter_thres must be in [0, 1), got {filter_thres}")
    eos_id = _integer(arrays, "eos_id", None)
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise RequestError(f"eos_id {eos_id} is outside the vocabulary 0..{vocab_size - 1}")
    top_k = _integer(arrays, "top_k", DEFAULTS.top_k)
    if top_k < 0:
        raise RequestError(f"top_k must be 0 (no limit) or a positive count, got {top_k}")
    top_p = _number(arrays, "top_p", DEFAULTS.top_p)
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    settings = GenerationSettings(new_tokens, temperature, filter_thres, _integer(arrays, "seed", DEFAULTS.seed),
                                  eos_id, top_k, top_p)
    # Triton's vLLM and TensorRT-LLM models stream only when asked; this model's own inputs stream by default
    return GenerateRequest(prompt, settings, text, text_input, _flag(arrays, "stream", not text_input),
                           _cancel_key(arrays) if "cancel_key" in arrays else None)


def parse_cancel(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The key of a cancel request (one holding only `cancel_key`), or None for any other request."""
    return _cancel_key(arrays) if set(arrays) == {"cancel_key"} else None


def _cancel_key(arrays: Mapping[str, np.ndarray]) -> str:
    values = np.asarray(arrays["cancel_key"]).reshape(-1)
    value = values[0] if values.size == 1 else None
    key = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if value is None or not (16 <= len(key) <= 64) or not all(c.isascii() and (c.isalnum() or c in "-_") for c in key):
        raise RequestError("cancel_key must be one string of 16 to 64 letters, digits, - or _ (a random one per "
                           "request, e.g. 32 hex digits)")
    return key


def _prompt(arrays: Mapping[str, np.ndarray], vocab_size: int) -> tuple[list[int], bool, bool]:
    """(token ids, came as text, came as text_input)."""
    given = [name for name in ("prompt", "prompt_ids", "text_input") if name in arrays]
    if len(given) != 1:
        raise RequestError("give exactly one of prompt (text) or prompt_ids (token ids)"
                           + (f"; got {' and '.join(given)}" if given else ""))
    if given[0] != "prompt_ids":
        name = given[0]
        values = np.asarray(arrays[name]).reshape(-1)
        if values.size != 1:
            raise RequestError(f"{name} must be one string, got {values.size}")
        value = values[0]
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not valid UTF-8 text; send text or prompt_ids") from None
        if not text:
            raise RequestError("the prompt is empty; send at least one character")
        try:
            return encode_text(text, vocab_size), True, name == "text_input"
        except ToolkitError:
            raise RequestError(f"text prompts need a vocabulary of at least 256 tokens (this model has {vocab_size}); "
                               "send prompt_ids instead") from None
    ids = np.asarray(arrays["prompt_ids"]).reshape(-1)
    if ids.size == 0:
        raise RequestError("prompt_ids is empty; send at least one token id")
    if ids.dtype.kind not in "iu":
        raise RequestError(f"prompt_ids must be integers, got {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise RequestError(f"prompt_ids holds {low if low < 0 else high}, outside the vocabulary 0..{vocab_size - 1}")
    return [int(i) for i in ids], False, False


def _flag(arrays: Mapping[str, np.ndarray], name: str, default: bool) -> bool:
    if name not in arrays:
        return default
    value = _scalar(arrays, name)
    if not isinstance(value, (bool, np.bool_)):
        raise RequestError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _scalar(arrays: Mapping[str, np.ndarray], name: str):
    values = np.asarray(arrays[name]).reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must be one number, got {values.size} values")
    return values[0]


def _integer(arrays: Mapping[str, np.ndarray], name: str, default: int | None) -> int | None:
    if name not in arrays:
        return default
    value = _scalar(arrays, name)
    if not isinstance(value, np.integer):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(arrays: Mapping[str, np.ndarray], name: str, default: float) -> float:
    if name not in arrays:
        return default
    value = _scalar(arrays, name)
    if not isinstance(value, (np.integer, np.floating)) or not math.isfinite(float(value)):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    return float(value)
