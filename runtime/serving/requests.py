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

# input name -> (Triton data type, dims, what it means); `prompt` or `prompt_ids` is required
INPUTS = {
    "prompt": ("TYPE_STRING", [1], "text prompt, byte-level tokens"),
    "prompt_ids": ("TYPE_INT64", [-1], "prompt token ids"),
    "max_new_tokens": ("TYPE_INT32", [1], "tokens to generate"),
    "temperature": ("TYPE_FP32", [1], "sampling temperature; <= 0 is greedy"),
    "filter_thres": ("TYPE_FP32", [1], "top-k filter: keep the top (1 - filter_thres) fraction of logits"),
    "seed": ("TYPE_INT64", [1], "sampling seed"),
    "eos_id": ("TYPE_INT64", [1], "stop after this token"),
}
OUTPUTS = {
    "token_id": ("TYPE_INT64", [-1], "the new tokens: one, or all a stream had pending when the server was behind"),
    "text": ("TYPE_STRING", [1], "their text: UTF-8 decoded incrementally, a multi-byte character completed "
                                 "by a later response"),
}
DEFAULTS = GenerationSettings()


class RequestError(ToolkitError, ValueError):
    """A request the server refuses; the message goes back to the client."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: list[int]
    settings: GenerationSettings
    text: bool  # the prompt came as text


def parse_request(arrays: Mapping[str, np.ndarray], vocab_size: int, limits: Limits,
                  capacity: int | None = None) -> GenerateRequest:
    """Check every input against the model and the limits; `capacity`: tokens a row can hold."""
    unknown = sorted(set(arrays) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r}; the inputs are {', '.join(INPUTS)}")
    prompt, text = _prompt(arrays, vocab_size)
    if len(prompt) > limits.max_prompt_tokens:
        raise RequestError(f"the prompt has {len(prompt)} tokens, over this server's limit of "
                           f"{limits.max_prompt_tokens} (max_prompt_tokens); shorten it")
    new_tokens = _integer(arrays, "max_new_tokens", limits.new_tokens_default)
    if not 1 <= new_tokens <= limits.max_new_tokens:
        raise RequestError(f"max_new_tokens must be between 1 and this server's limit of {limits.max_new_tokens}, "
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
    settings = GenerationSettings(new_tokens, temperature, filter_thres, _integer(arrays, "seed", DEFAULTS.seed),
                                  eos_id)
    return GenerateRequest(prompt, settings, text)


def _prompt(arrays: Mapping[str, np.ndarray], vocab_size: int) -> tuple[list[int], bool]:
    if ("prompt" in arrays) == ("prompt_ids" in arrays):
        raise RequestError("give exactly one of prompt (text) or prompt_ids (token ids)")
    if "prompt" in arrays:
        values = np.asarray(arrays["prompt"]).reshape(-1)
        if values.size != 1:
            raise RequestError(f"prompt must be one string, got {values.size}")
        value = values[0]
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise RequestError("prompt is not valid UTF-8 text; send text or prompt_ids") from None
        if not text:
            raise RequestError("the prompt is empty; send at least one character")
        try:
            return encode_text(text, vocab_size), True
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
    return [int(i) for i in ids], False


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
