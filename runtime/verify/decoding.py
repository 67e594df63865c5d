"""Decoder parity with PyTorch, for every Decoder alike: prompt logits of ragged rows,
teacher-forced decode steps, and greedy continuations compared token by token and then
teacher-forced through the decoder's own steps."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from models.precision import Precision, Tolerance, precision as lookup_precision
from models.transformer import Transformer

from ..decoding.base import Decoder, DecodingError
from ..decoding.engine import Engine
from ..decoding.generation import GenerationResult, GenerationSettings, generate
from . import DECODE_STEPS, GENERATE_PROMPT
from .tensors import Case, CaseResult, ParityReport, compare_outputs


def ragged_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` random prompts: the first `length` tokens long, the others shorter (ragged rows)."""
    rng = np.random.default_rng([seed, batch, length])
    lengths = [length] + [max(1, length * (batch - row) // (batch + 1)) for row in range(1, batch)]
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def random_prompts(vocab_size: int, batch: int = 2, length: int = GENERATE_PROMPT, seed: int = 0) -> list[list[int]]:
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


def check_decoder(model: Transformer, make_decoder, batches: list[int], lengths: list[int], steps: int = DECODE_STEPS,
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
    # Teacher forcing through the candidate's own decode steps: prefill the prompt, then step() the
    # reference's tokens one by one (cache writes and positions included); each step's logits against
    # PyTorch's full forward pass over the same tokens.
    teacher_forced_top1: float  # the fraction of steps whose argmax is the reference's token (or ties with it)
    min_top1: float  # the bar it must reach
    steps: CaseResult  # the steps' logits against the reference (max abs, cosine: the precision's bars)
    exact_tokens: bool = True  # greedy tokens must be identical (fp32); half precision may flip near-ties
    # Forced steps whose argmax is not the reference's token: {"row", "step", "reference", "candidate",
    # "reference_gap" (reference logit of its token minus that of the candidate's), "tie" (one ulp of
    # the precision at the largest logit: a gap within it is a tie and counts as agreement)}
    flips: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        tokens_ok = self.first_divergence is None or not self.exact_tokens
        return tokens_ok and self.teacher_forced_top1 >= self.min_top1 and self.steps.passed

    def summary(self) -> str:
        verdict = "passed" if self else "FAILED"
        ties = sum(flip["reference_gap"] <= flip["tie"] for flip in self.flips)
        flipped = f", {len(self.flips)} flipped, {ties} of them ties within one ulp" if self.flips else ""
        forced = (f"; teacher-forced through {self.steps.positions} decode steps: top-1 "
                  f"{self.teacher_forced_top1:.2%} (needs >= {self.min_top1:.0%}{flipped}), "
                  f"max abs {self.steps.max_abs:.3g}, "
                  f"cosine {self.steps.cosine:.6f}" + ("" if self.steps.passed else f" ({self.steps.problem})"))
        if self.first_divergence is None:
            return (f"generation parity {verdict}: {self.candidate} vs {self.reference}, "
                    f"{self.tokens_compared} greedy tokens identical{forced}")
        d = self.first_divergence
        return (f"generation parity {verdict}: {self.candidate} vs {self.reference} diverge at row {d['row']} step "
                f"{d['step']} (reference {d['reference']}, candidate {d['candidate']}; reference top-2 logit margin "
                f"there {d['reference_margin']:.3g}); {self.tokens_matched}/{self.tokens_compared} tokens matched"
                + (" (greedy tokens must be identical at this precision)" if self.exact_tokens else "") + forced)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": bool(self)}


def teacher_forced_steps(reference: Decoder, candidate: Decoder, prompts: list[list[int]],
                         continuations: list[list[int]], row: Precision, tolerance: Tolerance
                         ) -> tuple[float, CaseResult, list[dict]]:
    """Feed `continuations` through the candidate's decode path (the engine core, teacher forcing)
    and compare the logits before each token with the reference's full forward pass over the
    prompt and the continuation. Returns (top-1 agreement with the continuation, the logits'
    comparison, the flips). A flip to a token whose reference logit is within one ulp of `row`'s
    format (at the position's largest logit) of the continuation's is a tie and counts as agreement:
    the precision cannot order the two."""
    length = min(len(tokens) for tokens in continuations)
    rows = list(range(len(prompts)))
    forced = np.array([tokens[:length] for tokens in continuations], dtype=np.int64)  # (rows, length)
    full = reference.start({r: p + forced[r, :-1].tolist() for r, p in zip(rows, prompts)}, all_logits=True)
    reference.release(rows)
    # position len(prompt) - 1 + j predicts continuation token j
    expected = np.stack([row[len(p) - 1:len(p) - 1 + length].float().cpu().numpy() for row, p in zip(full, prompts)])
    seen: dict[int, list[np.ndarray]] = {}

    def record(handles: list[int], logits: torch.Tensor) -> None:  # copied: a step's buffer is reused
        for handle, values in zip(handles, logits.float().cpu().numpy()):
            seen.setdefault(handle, []).append(values.copy())

    engine = Engine(candidate, rows=len(prompts), prefill_tokens=sum(len(p) for p in prompts), on_logits=record)
    settings = GenerationSettings(max_new_tokens=length, temperature=0.0)
    handles = [engine.submit(prompt, settings, forced=forced[r, :-1].tolist()) for r, prompt in zip(rows, prompts)]
    try:
        while not engine.idle:
            for event in engine.step():
                if event.token is None:
                    raise DecodingError(event.error)
    finally:
        for handle in handles:
            engine.cancel(handle)
    got = [np.stack(seen[handle]) for handle in handles]
    actual = np.stack(got)  # (rows, length, vocab)
    top1, flips = forced_agreement(expected, actual.argmax(-1), forced, row)
    case = Case(len(prompts), 1, padded=len(prompts) > 1, past=max(len(p) for p in prompts))
    return top1, compare_outputs(expected, actual, tolerance, case, f"logits ({length} teacher-forced steps)"), flips


def forced_agreement(expected: np.ndarray, chosen: np.ndarray, forced: np.ndarray, row: Precision
                     ) -> tuple[float, list[dict]]:
    """(The fraction of positions where `chosen` is the `forced` token or ties with it in the
    reference's `expected` logits (rows, length, vocab), the flips): see teacher_forced_steps."""
    flips, agree = [], int((chosen == forced).sum())
    for r, j in zip(*np.nonzero(chosen != forced)):
        logits = expected[r, j]
        gap, tie = float(logits[forced[r, j]] - logits[chosen[r, j]]), row.ulp(float(np.abs(logits).max()))
        agree += gap <= tie
        flips.append({"row": int(r), "step": int(j), "reference": int(forced[r, j]), "candidate": int(chosen[r, j]),
                      "reference_gap": gap, "tie": tie})
    return (agree / forced.size if forced.size else 1.0), flips


def compare_generation(reference: Decoder, candidate: Decoder, prompts: list[list[int]], new_tokens: int,
                       precision: str = "fp32", tolerance: Tolerance | None = None) -> GenerationParity:
    """Greedy-decode both and report the first token where they part, with the reference's top-2
    margin there (a tiny margin means a near-tie, not a bug); then teacher-force the reference's
    tokens through the candidate's decode steps (teacher_forced_steps).

    It passes when every step's logits are within the precision's bars, the steps' top-1 reaches
    the teacher-forced bar, and, where the precision requires exact tokens (fp32), the greedy
    tokens are identical. Half precision (or quantized weights against the float model) may flip
    a near-tie and continue differently, so it is judged on the forced steps alone."""
    row = lookup_precision(precision)
    tolerance = tolerance or row.tolerance
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    expected = generate(reference, prompts, settings, record_margins=True)
    actual = generate(candidate, prompts, settings)
    compared, matched, divergence = token_agreement(expected, actual)
    top1, steps, flips = teacher_forced_steps(reference, candidate, prompts, expected.tokens, row, tolerance)
    return GenerationParity(reference.name, candidate.name, compared, matched, divergence, top1,
                            tolerance.forced_top1, steps, row.exact_tokens, flips)


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
                                            "reference_margin": expected.margins[row][step]}
                compared += min(len(want), len(got)) - step - 1
                break
            matched += 1
    return compared, matched, divergence
