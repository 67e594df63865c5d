"""Sampling tokens from any Decoder: the one token loop that `generate`, parity and the
benchmark's users share (upstream's `sample` semantics: temperature, top-k filter, Gumbel noise)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..resources import forward_bytes, require
from .base import Decoder, DecodingError
from .sampling import next_tokens, next_tokens_per_row, row_noise, top2_margin

GenerationError = DecodingError  # the name earlier releases raised


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # <= 0: greedy
    filter_thres: float = 0.9  # keep the top (1 - filter_thres) fraction of logits
    seed: int = 0
    eos_id: int | None = None

    def check(self, vocab_size: int | None = None) -> None:
        """Sane values, each error naming its flag."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DecodingError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature):
            raise DecodingError(f"--temperature must be a finite number, got {self.temperature}")
        if not (math.isfinite(self.filter_thres) and 0.0 <= self.filter_thres < 1.0):
            raise DecodingError(f"--filter-thres must be in [0, 1), got {self.filter_thres}")
        if self.eos_id is not None and vocab_size is not None and not 0 <= self.eos_id < vocab_size:
            raise DecodingError(f"--eos-id {self.eos_id} is outside the vocabulary 0..{vocab_size - 1}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (a row stops after its end token)
    prefill_seconds: float  # prompt in, first token out
    decode_seconds: float
    steps: int
    margins: list[list[float]] = field(default_factory=list)  # per step, per row: top-1 minus top-2 logit

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = sum(max(len(row) - 1, 0) for row in self.tokens)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class RowSampler:
    """One row's token choice with its own settings and generator. A row sampled alone draws exactly
    what `sample_loop` draws for a batch of one (noise of shape (1, vocab) per step from a generator
    seeded with `settings.seed`), so a server row equals offline `generate` of its prompt alone."""

    def __init__(self, settings: GenerationSettings):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.tokens: list[int] = []

    def choose(self, logits: Tensor) -> int:
        """`logits`: this row's next-token logits (vocab,) or (1, vocab); returns and records the token."""
        return choose_tokens([self], logits.reshape(1, -1))[0]

    @property
    def done(self) -> bool:
        """After max_new_tokens, or right after the end token (which is kept, as `generate` keeps it)."""
        eos = self.settings.eos_id
        return len(self.tokens) >= self.settings.max_new_tokens or (eos is not None and self.tokens[-1:] == [eos])


def draw_noise(samplers: list[RowSampler], vocab_size: int) -> list[Tensor | None]:
    """Each row's noise for its next token (None when greedy), drawn from its own generator."""
    return [row_noise(s.settings.temperature, s.settings.filter_thres, vocab_size, s.generator) for s in samplers]


def choose_tokens(samplers: list[RowSampler], logits: Tensor, noise: list[Tensor | None] | None = None) -> list[int]:
    """Each row of (rows, vocab) `logits` sampled by its own RowSampler, in one batched choice
    (`noise`: from draw_noise, when drawn ahead); the tokens are recorded and returned."""
    noise = draw_noise(samplers, logits.shape[-1]) if noise is None else noise
    tokens = next_tokens_per_row(logits, [s.settings.temperature for s in samplers], noise)
    for sampler, token in zip(samplers, tokens):
        sampler.tokens.append(token)
    return tokens


def check_request(decoder: Decoder, prompts: list[list[int]], settings: GenerationSettings) -> None:
    """Everything `generate` needs, checked before any work: rows, ids, settings and room in the cache."""
    settings.check(decoder.vocab_size)
    if not prompts:
        raise DecodingError("give at least one prompt")
    if len(prompts) > decoder.rows:
        raise DecodingError(f"{len(prompts)} prompts but the decoder has {decoder.rows} rows")
    decoder.check_prompts(dict(enumerate(prompts)))
    longest = max(len(p) for p in prompts) + settings.max_new_tokens
    if decoder.max_length and longest > decoder.max_length:
        raise DecodingError(f"prompt plus {settings.max_new_tokens} new tokens is {longest} tokens, past "
                            f"{decoder.capacity_hint}")
    require(forward_bytes(decoder.config, len(prompts), max(len(p) for p in prompts), settings.max_new_tokens, 4),
            f"{len(prompts)} row(s) of {longest} tokens", decoder.device.type,
            "shorten the prompt or ask for fewer new tokens")


def generate(decoder: Decoder, prompts: list[list[int]], settings: GenerationSettings,
             on_tokens: Callable[[int, list[int]], None] | None = None, record_margins: bool = False
             ) -> GenerationResult:
    """Generate up to max_new_tokens per prompt in rows 0..len(prompts)-1; `on_tokens(step, tokens)`
    streams each step. The rows are released afterwards."""
    check_request(decoder, prompts, settings)
    rows = list(range(len(prompts)))
    try:
        return sample_loop(lambda: decoder.start(dict(zip(rows, prompts))), decoder.step, len(prompts), settings,
                           decoder.device, on_tokens, record_margins)
    finally:
        decoder.release(rows)


def sample_loop(prefill: Callable[[], Tensor], step: Callable[[Tensor], Tensor], batch: int,
                settings: GenerationSettings, device: torch.device,
                on_tokens: Callable[[int, list[int]], None] | None = None, record_margins: bool = False
                ) -> GenerationResult:
    """`prefill()` returns the first next-token logits (batch, vocab), `step(tokens on device)` feeds
    the chosen tokens and returns the next ones."""
    generator = torch.Generator().manual_seed(settings.seed)
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    margins: list[list[float]] = []
    started = time.perf_counter()
    prefill_seconds, index = 0.0, 0
    logits = prefill()
    for index in range(settings.max_new_tokens):
        if record_margins:
            margins.append(top2_margin(logits).cpu().tolist())
        chosen = next_tokens(logits, settings.temperature, settings.filter_thres, generator)
        host = chosen.cpu()
        if index == 0:
            prefill_seconds = time.perf_counter() - started
        for row in range(batch):
            if not finished[row]:
                tokens[row].append(int(host[row]))
        if settings.eos_id is not None:
            finished |= host == settings.eos_id
        if on_tokens:
            on_tokens(index, host.tolist())
        if bool(finished.all()) or index + 1 == settings.max_new_tokens:
            break
        logits = step(chosen.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    return GenerationResult(tokens, prefill_seconds, total - prefill_seconds, index + 1, margins)
