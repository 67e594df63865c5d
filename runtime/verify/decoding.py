"""Decoder parity with PyTorch, for every Decoder alike: prompt logits of ragged rows,
teacher-forced decode steps, and greedy continuations compared token by token."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from models.precision import Tolerance, precision as lookup_precision
from models.transformer import Transformer

from ..decoding.base import Decoder
from ..decoding.generation import GenerationResult, GenerationSettings, generate
from .tensors import Case, ParityReport, compare_outputs


def ragged_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` random prompts: the first `length` tokens long, the others shorter (ragged rows)."""
    rng = np.random.default_rng([seed, batch, length])
    lengths = [length] + [max(1, length * (batch - row) // (batch + 1)) for row in range(1, batch)]
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def random_prompts(vocab_size: int, batch: int = 2, length: int = 8, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=length - row).tolist() for row in range(batch)]


def _reference_logits(model: Transformer, rows: list[list[int]], device: str) -> list[np.ndarray]:
    with torch.inference_mode():
        return [model(torch.tensor([row], device=device))[0].float().cpu().numpy() for row in rows]


def _check_one(model: Transformer, decoder: Decoder, report: ParityReport, length: int, steps: int, seed: int,
               device: str) -> None:
    """Prefill ragged prompts in every row, feed `steps` random tokens, compare with full forward passes."""
    batch, vocab = decoder.rows, model.config.num_tokens
    prompts = ragged_prompts(batch, length, vocab, seed)
    fed = np.random.default_rng([seed, batch, length, 1]).integers(0, vocab, size=(batch, steps))
    expected = _reference_logits(model, [p + fed[r].tolist() for r, p in enumerate(prompts)], device)
    got = decoder.start(dict(enumerate(prompts)), all_logits=True)
    ref = np.concatenate([expected[r][: len(p)] for r, p in enumerate(prompts)])
    report.results.append(compare_outputs(ref, torch.cat(got).float().cpu().numpy(), report.tolerance,
                                          Case(batch, length, padded=batch > 1), "logits (prompt)"))
    got_steps = [decoder.step(torch.as_tensor(fed[:, j], device=decoder.device)).float().cpu().numpy().copy()
                 for j in range(steps)]  # copied before the next step reuses the decoder's output buffer
    ref_steps = np.stack([[expected[r][len(p) + j] for j in range(steps)] for r, p in enumerate(prompts)])
    report.results.append(compare_outputs(ref_steps, np.stack(got_steps, axis=1), report.tolerance,
                                          Case(batch, 1, padded=batch > 1, past=length),
                                          f"logits ({steps} decode steps)"))


def check_decoder(model: Transformer, make_decoder, batches: list[int], lengths: list[int], steps: int = 8,
                  precision: str = "fp32", tolerance: Tolerance | None = None, seed: int = 0,
                  device: str = "cpu", progress=None) -> ParityReport:
    """For each batch x prompt length: prefill ragged prompts, then feed `steps` random tokens one
    by one; compare the prompt logits and every step's logits with PyTorch's full forward pass.
    `make_decoder(rows)` opens a Decoder; lengths that do not fit it are skipped."""
    row = lookup_precision(precision)
    report = None
    for batch in batches:
        with make_decoder(batch) as decoder:
            report = report or ParityReport("torch", decoder.name, row.dtype, tolerance or row.tolerance)
            for length in lengths:
                if decoder.max_length is not None and length + steps > decoder.max_length:
                    continue
                if progress:
                    progress(Case(batch, length, padded=batch > 1))
                _check_one(model, decoder, report, length, steps, seed, device)
    return report


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


def teacher_forced_top1(candidate: Decoder, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """The fraction of `continuations` tokens that are the candidate's argmax when it is fed the
    prompt and the continuation so far (one prefill, no sampling)."""
    rows = list(range(len(prompts)))
    logits = candidate.start({r: p + t[:-1] for r, p, t in zip(rows, prompts, continuations)}, all_logits=True)
    candidate.release(rows)
    # position len(prompt) - 1 predicts the first new token
    predicted = [row.argmax(-1).cpu()[len(p) - 1: len(p) - 1 + len(t)] for row, p, t in zip(logits, prompts, continuations)]
    return agreement(predicted, continuations)


def agreement(predicted: list, continuations: list[list[int]]) -> float:
    """The fraction of continuation tokens equal to the prediction at their position (one
    tensor of predicted ids per row, aligned with that row's continuation)."""
    total = sum(len(tokens) for tokens in continuations)
    agree = sum(int((row == torch.tensor(tokens)).sum()) for row, tokens in zip(predicted, continuations) if tokens)
    return agree / total if total else 1.0


def compare_generation(reference: Decoder, candidate: Decoder, prompts: list[list[int]],
                       new_tokens: int, min_top1: float | None = None) -> GenerationParity:
    """Greedy-decode both; report the first token where they part and the reference's top-2 margin
    there (a tiny margin means a near-tie, not a bug).

    Exact identity is the bar unless `min_top1` is given (half precision, where rounding may flip
    a near-tie): then the candidate is also teacher-forced with the reference's continuation and
    passes when its argmax agrees on at least that fraction of the tokens."""
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    expected = generate(reference, prompts, settings, record_margins=True)
    actual = generate(candidate, prompts, settings)
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
