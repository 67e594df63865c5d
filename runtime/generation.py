"""Autoregressive generation over any Backend: with a key/value cache when the graph has one
(the cache stays where the backend keeps it: on the GPU for CUDA backends), otherwise by
re-running the whole sequence each step."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from models.config import ModelConfig
from models.errors import ToolkitError

from .backends import Backend
from .sampling import next_tokens, top2_margin


class GenerationError(ToolkitError):
    """Bad prompts or settings for generation."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # <= 0: greedy
    filter_thres: float = 0.9  # keep the top (1 - filter_thres) fraction of logits
    seed: int = 0
    eos_id: int | None = None


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (a row stops after its end token)
    prefill_seconds: float
    decode_seconds: float
    steps: int
    margins: list[list[float]] = field(default_factory=list)  # per step, per row: top-1 minus top-2 logit

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = sum(max(len(row) - 1, 0) for row in self.tokens)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def model_config_of(backend: Backend) -> ModelConfig | None:
    """The model config a backend carries (PyTorch model, or the graph's metadata)."""
    model = getattr(backend, "model", None)
    if model is not None:
        return model.config
    metadata = getattr(backend, "metadata", {}) or {}
    return ModelConfig.from_json(metadata["model_config"]) if "model_config" in metadata else None


def left_pad(prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Ragged prompts -> (ids, mask), padded on the left so every row ends at the last column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
        mask[row, width - len(prompt):] = 1
    return ids, mask


class Generator:
    """Drives a backend token by token. The backend's graph decides the mode: with inputs
    past_key_values.* it decodes through the cache, otherwise it recomputes the sequence."""

    def __init__(self, backend: Backend, device: str | None = None):
        self.backend = backend
        self.config = model_config_of(backend)
        names = backend.input_names
        self.cache_inputs = [n for n in names if n.startswith("past_key_values.")]
        self.device = torch.device(device or getattr(backend, "device", None) or
                                   ("cuda" if getattr(backend, "provider", "cpu") == "cuda"
                                    or backend.name.startswith("tensorrt") else "cpu"))

    def empty_cache(self, batch: int) -> dict[str, Tensor]:
        """Zero-length past caches for every cache input (the prefill step)."""
        cache = {}
        for meta in self.backend.inputs:
            if meta.name in self.cache_inputs:
                _, heads, _, dim_head = meta.shape
                cache[meta.name] = torch.zeros(batch, heads, 0, dim_head, dtype=getattr(torch, meta.dtype),
                                               device=self.device)
        return cache

    def check_prompt(self, prompts: list[list[int]], settings: GenerationSettings) -> None:
        vocab = self.backend.vocab_size or (self.config.num_tokens if self.config else None)
        limit = self.config.max_seq_len if self.config else None
        check_request(prompts, settings, vocab, limit,
                      f"the model's max_seq_len of {limit}; shorten the prompt or --max-new-tokens")

    def generate(self, prompts: list[list[int]], settings: GenerationSettings,
                 on_tokens: Callable[[int, list[int]], None] | None = None, record_margins: bool = False
                 ) -> GenerationResult:
        """Generate up to max_new_tokens per prompt; `on_tokens(step, tokens)` streams each step."""
        self.check_prompt(prompts, settings)
        ids, mask = left_pad(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        feeds = {"input_ids": ids, "attention_mask": mask, **self.empty_cache(ids.shape[0])}
        self.backend.check_feeds(feeds)
        state = {"feeds": feeds, "mask": mask, "sequence": ids}

        def prefill() -> Tensor:
            state["outputs"] = self.backend.run_torch(state["feeds"])
            return state["outputs"]["logits"][:, -1]  # (b, vocab)

        def step(chosen: Tensor) -> Tensor:
            chosen = chosen[:, None]
            state["mask"] = torch.cat((state["mask"], torch.ones_like(chosen)), dim=1)
            if self.cache_inputs:
                feeds = {"input_ids": chosen, "attention_mask": state["mask"]}
                for name in self.cache_inputs:
                    feeds[name] = state["outputs"][name.replace("past_key_values.", "present.")]
            else:
                state["sequence"] = torch.cat((state["sequence"], chosen), dim=1)
                feeds = {"input_ids": state["sequence"], "attention_mask": state["mask"]}
            state["outputs"] = self.backend.run_torch(feeds)
            return state["outputs"]["logits"][:, -1]

        return sample_loop(prefill, step, len(prompts), settings, self.device, on_tokens, record_margins)


def check_request(prompts: list[list[int]], settings: GenerationSettings, vocab: int | None,
                  limit: int | None, limit_text: str) -> None:
    """Token ids inside the vocabulary, prompt + new tokens within `limit` (described by
    `limit_text` in the error), and sane settings."""
    for prompt in prompts:
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is out of range; the vocabulary is 0..{vocab - 1}")
    longest = max((len(p) for p in prompts), default=0) + settings.max_new_tokens
    if limit and longest > limit:
        raise GenerationError(f"prompt plus {settings.max_new_tokens} new tokens is {longest} tokens, past {limit_text}")
    if settings.max_new_tokens < 1:
        raise GenerationError("--max-new-tokens must be at least 1")
    if not 0.0 <= settings.filter_thres < 1.0:
        raise GenerationError(f"--filter-thres must be in [0, 1), got {settings.filter_thres}")


def sample_loop(prefill: Callable[[], Tensor], step: Callable[[Tensor], Tensor], batch: int,
                settings: GenerationSettings, device: torch.device,
                on_tokens: Callable[[int, list[int]], None] | None = None, record_margins: bool = False
                ) -> GenerationResult:
    """The token loop every generator shares: `prefill()` returns the first next-token logits
    (batch, vocab), `step(tokens on device)` feeds the chosen tokens and returns the next ones."""
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


def encode_text(text: str, vocab_size: int) -> list[int]:
    """Byte-level encoding (as upstream's enwik8 training): one token per UTF-8 byte."""
    if vocab_size < 256:
        raise GenerationError(f"text prompts are byte-level and need a vocabulary of at least 256 tokens "
                              f"(this model has {vocab_size}); pass --prompt-ids instead")
    return list(text.encode("utf-8"))


def decode_bytes(tokens: list[int]) -> str:
    """Tokens below 256 as UTF-8 bytes; others as <id>."""
    out, pending = [], bytearray()
    for token in tokens:
        if token < 256:
            pending.append(token)
            continue
        out.append(pending.decode("utf-8", errors="replace"))
        pending.clear()
        out.append(f"<{token}>")
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)
