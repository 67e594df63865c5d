"""Greedy continuations compared token by token between two backends."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .backends import Backend
from .generation import GenerationResult, GenerationSettings, Generator, left_pad


@dataclass
class GenerationParity:
    reference: str
    candidate: str
    tokens_compared: int
    tokens_matched: int
    first_divergence: dict | None  # {"row", "step", "reference", "candidate", "reference_margin"}
    # Half precision only: the candidate's argmax fed the reference's tokens, and the bar it must reach.
    teacher_forced_top1: float | None = None
    min_top1: float | None = None

    def __bool__(self) -> bool:
        if self.first_divergence is None:
            return True
        return self.min_top1 is not None and (self.teacher_forced_top1 or 0.0) >= self.min_top1

    def summary(self) -> str:
        verdict = "passed" if self else "FAILED"
        forced = ("" if self.teacher_forced_top1 is None else
                  f"; teacher-forced top-1 agreement {self.teacher_forced_top1:.2%} (needs >= {self.min_top1:.0%})")
        if self.first_divergence is None:
            return (f"generation parity {verdict}: {self.candidate} vs {self.reference}, "
                    f"{self.tokens_compared} greedy tokens identical{forced}")
        d = self.first_divergence
        return (f"generation parity {verdict}: {self.candidate} vs {self.reference} diverge at row {d['row']} step "
                f"{d['step']} (reference {d['reference']}, candidate {d['candidate']}; reference top-2 logit margin "
                f"there {d['reference_margin']:.3g}); {self.tokens_matched}/{self.tokens_compared} tokens matched"
                f"{forced}")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": bool(self)}


def random_prompts(vocab_size: int, batch: int = 2, length: int = 8, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=length - row).tolist() for row in range(batch)]


def teacher_forced_top1(candidate: Backend, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """The fraction of `continuations` tokens that are the candidate's argmax when it is fed the
    prompt and the continuation so far (one full forward pass, no sampling)."""
    generator = Generator(candidate)
    inputs = [prompt + tokens[:-1] for prompt, tokens in zip(prompts, continuations)]
    ids, mask = left_pad(inputs)
    feeds = {"input_ids": ids.to(generator.device), "attention_mask": mask.to(generator.device),
             **generator.empty_cache(len(inputs))}
    predicted = candidate.run_torch(feeds)["logits"].argmax(-1).cpu()  # (b, width)
    # left-padded rows end at the last column: the last len(tokens) positions predict them
    return agreement([predicted[row, predicted.shape[1] - len(tokens):] for row, tokens in enumerate(continuations)],
                     continuations)


def agreement(predicted: list, continuations: list[list[int]]) -> float:
    """The fraction of continuation tokens equal to the prediction at their position (one
    tensor of predicted ids per row, aligned with that row's continuation)."""
    total = sum(len(tokens) for tokens in continuations)
    agree = sum(int((row == torch.tensor(tokens)).sum()) for row, tokens in zip(predicted, continuations) if tokens)
    return agree / total if total else 1.0


def compare_generation(reference: Backend, candidate: Backend, prompts: list[list[int]],
                       new_tokens: int, min_top1: float | None = None) -> GenerationParity:
    """Greedy-decode both backends; report the first token where they part and the reference's
    top-2 margin there (a tiny margin means a near-tie, not a bug).

    Exact identity is the bar unless `min_top1` is given (half precision, where rounding may flip
    a near-tie): then the candidate is also teacher-forced with the reference's continuation and
    passes when its argmax agrees on at least that fraction of the tokens."""
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    expected = Generator(reference).generate(prompts, settings, record_margins=True)
    actual = Generator(candidate).generate(prompts, settings)
    compared, matched, divergence = token_agreement(expected, actual)
    forced = None if min_top1 is None else teacher_forced_top1(candidate, prompts, expected.tokens)
    return GenerationParity(reference.name, candidate.name, compared, matched, divergence, forced, min_top1)


def token_agreement(expected: GenerationResult, actual: GenerationResult) -> tuple[int, int, dict | None]:
    """(tokens compared, tokens matched, the first divergence) between two greedy runs; a row
    stops matching at its first differing token. `expected` must carry its margins."""
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
    return compared, matched, divergence
