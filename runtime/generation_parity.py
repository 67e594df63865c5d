"""Greedy continuations compared token by token between two backends."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .backends import Backend
from .generation import GenerationSettings, Generator


@dataclass
class GenerationParity:
    reference: str
    candidate: str
    tokens_compared: int
    tokens_matched: int
    first_divergence: dict | None  # {"row", "step", "reference", "candidate", "reference_margin"}

    def __bool__(self) -> bool:
        return self.first_divergence is None

    def summary(self) -> str:
        if self:
            return (f"generation parity passed: {self.candidate} vs {self.reference}, "
                    f"{self.tokens_compared} greedy tokens identical")
        d = self.first_divergence
        return (f"generation parity FAILED: {self.candidate} vs {self.reference} diverge at row {d['row']} step "
                f"{d['step']} (reference {d['reference']}, candidate {d['candidate']}; reference top-2 logit margin "
                f"there {d['reference_margin']:.3g}); {self.tokens_matched}/{self.tokens_compared} tokens matched")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": bool(self)}


def random_prompts(vocab_size: int, batch: int = 2, length: int = 8, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=length - row).tolist() for row in range(batch)]


def compare_generation(reference: Backend, candidate: Backend, prompts: list[list[int]],
                       new_tokens: int) -> GenerationParity:
    """Greedy-decode both backends; report the first token where they part and the reference's
    top-2 margin there (a tiny margin means a near-tie, not a bug)."""
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    expected = Generator(reference).generate(prompts, settings, record_margins=True)
    actual = Generator(candidate).generate(prompts, settings)
    compared = matched = 0
    divergence = None
    for row, (want, got) in enumerate(zip(expected.tokens, actual.tokens)):
        for step, (a, b) in enumerate(zip(want, got)):
            compared += 1
            if a != b:
                divergence = divergence or {"row": row, "step": step, "reference": a, "candidate": b,
                                            "reference_margin": expected.margins[step][row]}
                compared += min(len(want), len(got)) - step - 1
                break
            matched += 1
    return GenerationParity(reference.name, candidate.name, compared, matched, divergence)
