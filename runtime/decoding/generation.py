"""`generate`: prompts in, tokens out, through the engine core (runtime.decoding.engine), the same
token loop the server and the benchmark run, with upstream's `sample` semantics (temperature, top-k
filter, Gumbel noise; runtime.decoding.sampling)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..resources import forward_bytes, require
from .base import Decoder, DecodingError
from .engine import Engine, check_room
from .sampling import top2_margin
from .settings import GenerationSettings

GenerationError = DecodingError  # the name earlier releases raised
__all__ = ["GenerationSettings", "GenerationResult", "GenerationError", "check_request", "generate"]


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (a row stops after its end token)
    prefill_seconds: float  # prompt in, first token out
    decode_seconds: float
    steps: int  # engine steps
    margins: list[list[float]] = field(default_factory=list)  # per row, per token: top-1 minus top-2 logit

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = sum(max(len(row) - 1, 0) for row in self.tokens)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def check_request(decoder: Decoder, prompts: list[list[int]], settings: GenerationSettings) -> None:
    """Everything `generate` needs, checked before any work: rows, ids, settings and room in the cache."""
    settings.check(decoder.vocab_size)
    if not prompts:
        raise DecodingError("give at least one prompt")
    if len(prompts) > decoder.rows:
        raise DecodingError(f"{len(prompts)} prompts but the decoder has {decoder.rows} rows")
    decoder.check_prompts(dict(enumerate(prompts)))
    check_room(decoder, max(len(p) for p in prompts), settings)
    longest = max(len(p) for p in prompts) + settings.max_new_tokens
    require(forward_bytes(decoder.config, len(prompts), max(len(p) for p in prompts), settings.max_new_tokens, 4),
            f"{len(prompts)} row(s) of {longest} tokens", decoder.device.type,
            "shorten the prompt or ask for fewer new tokens")


def generate(decoder: Decoder, prompts: list[list[int]], settings: GenerationSettings,
             on_token: Callable[[int, int], None] | None = None, record_margins: bool = False
             ) -> GenerationResult:
    """Generate up to max_new_tokens per prompt, all prompts admitted in the first step;
    `on_token(prompt index, token)` streams each token as its step is read. The engine's
    overlapped loop runs where the decoder's steps are queued (decoder.queues_steps), unless
    `record_margins` needs each step's logits as it runs."""
    check_request(decoder, prompts, settings)
    margins: dict[int, list[float]] = {}

    def record(handles: list[int], logits: torch.Tensor) -> None:
        for handle, margin in zip(handles, top2_margin(logits).cpu().tolist()):
            margins.setdefault(handle, []).append(margin)

    engine = Engine(decoder, rows=len(prompts), prefill_tokens=sum(len(p) for p in prompts),
                    on_logits=record if record_margins else None,
                    overlap=decoder.queues_steps and not record_margins)
    handles = [engine.submit(prompt, settings) for prompt in prompts]
    index_of = {handle: index for index, handle in enumerate(handles)}
    tokens: list[list[int]] = [[] for _ in prompts]
    # before the clock: the pick's kernels compiled and the step recorded with it, as the server does
    # at start; otherwise the first decode step runs unrecorded (blocking the host where the decoder's
    # own run synchronises), and overlapped, that step would be queued before the first tokens are read
    engine.warm_up(settings)
    started = time.perf_counter()
    prefill_seconds, steps = None, 0
    try:
        while not engine.idle:
            events = engine.step()
            if not events:
                continue  # overlapped: the first call only queues the first step
            steps += 1
            if prefill_seconds is None:
                # prompt in, first tokens on the host; overlapped, after the first decode step is queued
                prefill_seconds = time.perf_counter() - started
            for event in events:
                if event.token is None:
                    raise DecodingError(event.error)
                tokens[index_of[event.request]].append(event.token)
                if on_token:
                    on_token(index_of[event.request], event.token)
    finally:
        for handle in handles:
            engine.cancel(handle)
    if decoder.device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    return GenerationResult(tokens, prefill_seconds or 0.0, total - (prefill_seconds or 0.0), steps,
                            [margins.get(h, []) for h in handles])
