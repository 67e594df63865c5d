"""Fake streams and seeded mixed requests for the scheduler and server tests."""
from __future__ import annotations

import random
import threading

from runtime.decoding.generation import GenerationSettings


class FakeStream:
    """Collects what the scheduler sends; `cancel_after` tokens it reports the client gone."""

    def __init__(self, cancel_after: int | None = None):
        self.tokens: list[int] = []
        self.responses: list[list[int]] = []  # each response's tokens
        self.finals: list[bool] = []  # each response's final flag
        self.error: str | None = None
        self.ended = False
        self.cancel_after = cancel_after
        self.done = threading.Event()

    def send(self, tokens: list[int], final: bool) -> None:
        self.tokens.extend(tokens)
        self.responses.append(list(tokens))
        self.finals.append(final)
        if final:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()

    def end(self) -> None:
        self.ended = True
        self.done.set()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after


def mixed_requests(count: int, seed: int, max_prompt: int, max_new: int) -> list[tuple[list[int], GenerationSettings]]:
    """Prompts of 1..max_prompt ids and 1..max_new tokens, greedy or sampled (some with top_k or
    top_p), some with an end id."""
    rng = random.Random(seed)
    made = []
    for index in range(count):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, max_prompt))]
        settings = GenerationSettings(rng.randint(1, max_new), rng.choice([0.0, 0.8, 1.0]), rng.choice([0.5, 0.9]),
                                      seed=index * 7 + 1, eos_id=rng.choice([None, None, 32]),
                                      top_k=rng.choice([0, 0, 5]), top_p=rng.choice([1.0, 1.0, 0.8]))
        made.append((prompt, settings))
    return made
